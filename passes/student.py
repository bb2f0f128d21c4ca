"""The ``student/`` artifact: a pruned UNet saved as data, never as a pickle.

``config.json`` (the dense diffusers config), ``plan.json`` (the RemovalPlan), ``trace.json`` (what the trace
needs to be repeated: input names, example shapes and dtypes, granularity, model class, and for which inputs the
trace is valid) and ``diffusion_pytorch_model.safetensors`` (the pruned graph's state_dict). Loading rebuilds the
dense model from its config, traces it again, replays the plan and loads the weights strictly: the graph is
recomputed from code and data, so no module objects are ever unpickled.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldpruner.base.errors import ArtifactError, LdprunerError, ModelLoadError
from ldpruner.base.io import atomic_dir, check_replaceable, json_safe, read_json
from ldpruner.base.unet_inputs import DOWN_RESIDUAL, INTRA_RESIDUAL, MID_RESIDUAL, residual_names
from ldpruner.compiler.graph import build_operator_graph
from ldpruner.compiler.signature import adapter_features, controlnet_residuals
from ldpruner.compiler.tracer import trace_unet

from .plan import PLAN, RemovalPlan
from .remove import PrunedUNet, RemoveOperators, apply_plan

__all__ = ["STUDENT_FILES", "TRACE_FORMAT", "WEIGHTS_NAME", "load_student", "read_safetensors", "save_student",
           "student_config", "tensors_for_safetensors"]

CONFIG_NAME = "config.json"
PLAN_NAME = PLAN.name
TRACE_NAME = "trace.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
STUDENT_FILES = (CONFIG_NAME, PLAN_NAME, TRACE_NAME, WEIGHTS_NAME)
TRACE_FORMAT = "ldpruner.trace/1"
_ALIASES_KEY = "ldpruner.aliases"  # safetensors metadata: {alias key: key whose tensor it shares}


def save_student(
    pruned: PrunedUNet,
    path: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``pruned`` as a ``student/`` folder at ``path`` (atomically: complete or absent).

    ``config`` defaults to ``pruned.config``; for a diffusers UNet it is ``model.config``. A model that is not a
    diffusers UNet may be saved without one; loading it then needs ``load_student(path, model=...)``."""
    from safetensors.torch import save_file

    path = Path(path)
    check_replaceable(path, overwrite)
    config = config if config is not None else pruned.config
    traced = pruned.traced
    config_json = student_config(config, traced.model_class)
    tensors, aliases = tensors_for_safetensors(pruned.gm.state_dict())
    trace = {
        "format": TRACE_FORMAT,
        "model_class": traced.model_class,
        "granularity": traced.granularity.value,
        "input_names": list(traced.input_names),
        "example_inputs": {
            n: {"shape": list(traced.example_inputs[n].shape), "dtype": _dtype_name(traced.example_inputs[n].dtype)}
            for n in traced.input_names
        },
        "param_dtype": _dtype_name(next(pruned.gm.parameters()).dtype),
        "params": sum(p.numel() for p in pruned.gm.parameters()),
        "validity": traced.validity(),
        "rewrite": pruned.summary,
    }
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        pruned.plan.save(tmp / PLAN_NAME)
        (tmp / TRACE_NAME).write_text(json.dumps(trace, indent=2) + "\n")
        # safetensors writes metadata keys in a per-process hash order: with one key the file is byte-stable
        metadata = {"format": "pt", **({_ALIASES_KEY: json.dumps(aliases)} if aliases else {})}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
    return path


def load_student(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    extra_leaf_types: Iterable[type] = (),
    extra_operator_types: Iterable[type] = (),
    controlnet: bool = False,
    adapter: bool = False,
) -> PrunedUNet:
    """Rebuild a pruned UNet from a ``student/`` folder: dense model from ``config.json`` (or ``model``, any
    module of the same architecture; it is copied, never changed), trace at the recorded shapes, replay
    ``plan.json``, load the weights strictly. ``controlnet`` / ``adapter``: trace with ControlNet's residuals /
    T2I-Adapter's features as inputs (a student saved with them has them anyway). Raises :class:`ArtifactError`
    for missing or unreadable files and :class:`ModelLoadError` when the weights do not fit the rebuilt graph."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"student folder {str(path)!r} does not exist")
    missing = [name for name in STUDENT_FILES if not (path / name).is_file()]
    if missing:
        raise ArtifactError(f"student folder {str(path)!r} lacks {missing}; a student holds {list(STUDENT_FILES)}")
    config = read_json(path / CONFIG_NAME, what="student config")
    trace = read_json(path / TRACE_NAME, what="student trace")
    if trace.get("format") != TRACE_FORMAT:
        raise ArtifactError(f"{str(path / TRACE_NAME)!r} has format {trace.get('format')!r}, expected {TRACE_FORMAT!r}")
    plan = RemovalPlan.load(path / PLAN_NAME)
    state = read_safetensors(path / WEIGHTS_NAME)  # read before the expensive rebuild: a bad file fails fast

    try:
        dtype = _dtype(trace["param_dtype"])
        example_inputs = _example_inputs(trace["example_inputs"])
        input_names = list(trace["input_names"])
        unknown = [n for n in input_names if n not in example_inputs]
        if unknown:
            raise KeyError(f"input_names {unknown} have no example_inputs entry")
        granularity = trace["granularity"]
        model_class = trace["model_class"]
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{str(path / TRACE_NAME)!r} is malformed: {type(exc).__name__}: {exc}") from exc
    if model is None:
        model = _model_from_config(config, model_class)
    elif type(model).__name__ != model_class:
        raise ModelLoadError(f"the student was traced from a {model_class}, "
                             f"the model given is a {type(model).__name__}")
    else:  # the rewrite deletes submodules of the traced module: never the caller's
        model = copy.deepcopy(model)
    if next(model.parameters()).dtype != dtype:  # diffusers warns on any .to(dtype), even a no-op one
        model = model.to(dtype)
    model = model.eval()

    # a student saved after .to(float16) recorded float32 examples: the trace takes them in the weights' dtype
    inputs = {n: _like_weights(example_inputs[n], dtype) for n in input_names}
    inputs.update(_residual_examples(model, inputs, controlnet=controlnet, adapter=adapter))
    try:
        traced = trace_unet(model, inputs, granularity=granularity, copy_model=False,
                            extra_leaf_types=tuple(extra_leaf_types))
        operator_graph = build_operator_graph(traced, extra_operator_types=extra_operator_types)
        # the plan was verified when the student was made; replaying it keeps the rewrite's own checks (exact
        # parameter count, a run on the example inputs) and leaves out the verifier's extra run
        result = apply_plan(traced.gm, plan, operator_graph, verify=False, allow_empty=not plan.removals)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:  # not ldpruner's own: an edited file
        if isinstance(exc, LdprunerError):
            raise
        raise ArtifactError(f"the student in {str(path)!r} cannot be rebuilt from its files ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}): {TRACE_NAME}, {PLAN_NAME} and {CONFIG_NAME} do "
                            "not fit together (edited?); prune again to remake it") from exc
    _load_state(result.gm, state, path / WEIGHTS_NAME)
    return PrunedUNet(traced=traced, plan=plan, summary=result.summary[RemoveOperators.__name__],
                      config=None if config.get("_ldpruner_not_diffusers") else config)


def _like_weights(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating example input in the weights' dtype (the timestep and integer labels stay as they are)."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _residual_examples(model: nn.Module, inputs: dict[str, torch.Tensor], *, controlnet: bool,
                       adapter: bool) -> dict[str, torch.Tensor]:
    """Example ControlNet residuals / T2I-Adapter features the trace lacks and is asked for."""
    out: dict[str, torch.Tensor] = {}
    plain = {n: t for n, t in inputs.items() if not n.startswith((DOWN_RESIDUAL, MID_RESIDUAL, INTRA_RESIDUAL))}
    if controlnet and not residual_names(list(inputs)):
        out.update(controlnet_residuals(model, plain))
    if adapter and not residual_names(list(inputs), INTRA_RESIDUAL):
        out.update(adapter_features(model, plain))
    return out


def with_residual_inputs(pruned: PrunedUNet, *, controlnet: bool = False, adapter: bool = False) -> PrunedUNet:
    """``pruned`` traced again with ControlNet's residuals (``down_block_additional_residual_<i>``,
    ``mid_block_additional_residual``) and/or T2I-Adapter's features (``down_intrablock_additional_residual_<i>``)
    as graph inputs: the dense model rebuilt from the config, the plan replayed, the weights copied. Removals
    substitute operators and never delete a skip tensor or a block output, so each residual lands where it lands in
    the dense model; the replay checks every removal's parameter count against the plan."""
    if pruned.config is None:
        raise ArtifactError("a student without a diffusers config cannot be traced again with residual inputs")
    model = _model_from_config(pruned.config, pruned.traced.model_class)
    param = next(pruned.gm.parameters())
    model = model.to(device=param.device, dtype=param.dtype).eval()
    inputs = {n: _like_weights(t, param.dtype).to(param.device) for n, t in pruned.traced.example_inputs.items()}
    extra = _residual_examples(model, inputs, controlnet=controlnet, adapter=adapter)
    if not extra:
        return pruned
    inputs.update(extra)
    traced = trace_unet(model, inputs, granularity=pruned.traced.granularity.value, copy_model=False)
    graph = build_operator_graph(traced)
    result = apply_plan(traced.gm, pruned.plan, graph, verify=False, allow_empty=not pruned.plan.removals)
    missing, unexpected = result.gm.load_state_dict(pruned.gm.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"the student's weights do not fit its trace with residual inputs (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
    return PrunedUNet(traced=traced, plan=pruned.plan, summary=pruned.summary, config=pruned.config)


# --- config ---------------------------------------------------------------------------------------------------
def student_config(config: Mapping[str, Any] | None, model_class: str) -> dict[str, Any]:
    """The dense model's diffusers config as a student carries it (config.json, and beside the ONNX export): plain
    JSON values, diffusers' bookkeeping keys dropped, ``_class_name`` and ``_diffusers_version`` set."""
    if config is None:
        if model_class in ("UNet2DConditionModel", "UNet2DModel"):
            raise ArtifactError(f"saving a {model_class} needs its diffusers config: pass config=model.config "
                                "(to prune(...) or to save_student(...))")
        return {"_class_name": model_class, "_ldpruner_not_diffusers": True}
    import diffusers

    out = json_safe(dict(config), drop_private_keys=True)
    out["_class_name"] = model_class
    out["_diffusers_version"] = diffusers.__version__
    return out


def _model_from_config(config: Mapping[str, Any], model_class: str) -> nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    classes = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}
    cls_name = config.get("_class_name", model_class)
    if cls_name != model_class:
        raise ModelLoadError(f"config.json describes a {cls_name}, trace.json a {model_class}")
    if cls_name not in classes:
        raise ModelLoadError(f"the student was made from a {cls_name}, which is not a diffusers UNet, so it cannot "
                             "be rebuilt from config.json; pass model=<an instance of that architecture>")
    try:
        with _skip_init():
            model = classes[cls_name].from_config(dict(config))
    except Exception as exc:  # diffusers raises plain TypeError/ValueError on a bad config
        raise ModelLoadError(f"cannot build {cls_name} from config.json: {type(exc).__name__}: {exc}") from exc
    # every weight is overwritten by the strict load; zeros make the trace deterministic and cheap for big models
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _skip_init() -> contextlib.AbstractContextManager:
    """diffusers' own no_init_weights (random init of 860M parameters is seconds of wasted work); plain init when
    a diffusers version lacks it."""
    try:
        from diffusers.models.modeling_utils import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


# --- trace ----------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _example_inputs(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Seeded inputs with the recorded shapes: the trace depends on shapes and dtypes, not on values."""
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for name, s in spec.items():
        shape = s["shape"]
        if not (isinstance(shape, list) and len(shape) <= 8 and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape)):
            raise ValueError(f"example input {name!r} has shape {shape!r}; a shape is a list of positive sizes")
        dtype = _dtype(s["dtype"])
        if dtype.is_floating_point:
            inputs[name] = torch.randn(tuple(s["shape"]), generator=gen).to(dtype)
        else:
            inputs[name] = torch.zeros(tuple(s["shape"]), dtype=dtype)
    return inputs


# --- weights --------------------------------------------------------------------------------------------------
def tensors_for_safetensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory: identical views are written once and recorded as aliases,
    other overlapping views are written as copies."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel():
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                    t.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
        tensors[name] = t
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors.values() if t.numel())
    return {
        name: (t.clone() if t.numel() and storages[t.untyped_storage().data_ptr()] > 1 else t).contiguous().cpu()
        for name, t in tensors.items()
    }, aliases


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        state = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                state[key] = f.get_tensor(key)
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except Exception as exc:  # safetensors raises SafetensorError, OSError or a JSON error on a corrupt file
        raise ArtifactError(f"{str(path)!r} is not a readable safetensors file: {type(exc).__name__}: {exc}") from exc
    for alias, key in aliases.items():
        if key not in state:
            raise ArtifactError(f"{str(path)!r}: alias {alias!r} points to {key!r}, which the file lacks")
        state[alias] = state[key]
    return state


def _load_state(gm: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = gm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)}, graph {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {shapes[:3]})")
        raise ModelLoadError(f"the weights in {str(path)!r} do not fit the rebuilt graph: " + "; ".join(parts)
                             + " (was the folder written for another plan or config?)")
    try:
        gm.load_state_dict(dict(state), strict=True)
    except (RuntimeError, LdprunerError) as exc:
        raise ModelLoadError(f"cannot load {str(path)!r}: {exc}") from exc
