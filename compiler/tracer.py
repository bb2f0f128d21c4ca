"""Trace a UNet into a torch.fx GraphModule whose call_module nodes are the prunable operators.

Plain ``torch.fx.symbolic_trace`` fails on diffusers UNets: their forward branches on shapes
(``for dim in sample.shape[-2:]``, ``len(timesteps.shape)``, ``hidden_states.ndim == 4``). This tracer
carries, next to every proxy, the concrete value the node takes on the example inputs. Shape arithmetic
stays symbolic (so batch and spatial size stay dynamic in the graph); only the points where python needs a
concrete answer (``bool``, ``int``, ``len``) are evaluated on the example inputs, and each such decision is
recorded with its source line, so the artifact says for which inputs the trace is valid.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import linecache
import operator
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from ldpruner.base.errors import TraceError, UnsupportedModelError
from ldpruner.base.unet_inputs import INTRA_RESIDUAL, MID_RESIDUAL, residual_names

from .diffusers_call import call_diffusers_unet, flat_call
from .operators import Granularity, leaf_operator_types, parse_granularity
from .signature import unet_example_inputs, unet_input_names

# why parameters can be outside a traced graph (inspect, the plan and the report say it with the modules)
OUTSIDE_WHY = ("modules that run only with inputs the trace does not pass (GLIGEN's grounding, given as "
               "cross_attention_kwargs['gligen']): not scored, not pruned, and not in the student or the ONNX export")

__all__ = ["OUTSIDE_WHY", "Decision", "TracedUNet", "call_diffusers_unet", "trace_unet", "unet_example_inputs",
           "unet_input_names"]

_THIS_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


@dataclasses.dataclass(frozen=True)
class Decision:
    """A python-level branch the model took on the example inputs while being traced."""

    kind: str  # "bool" | "len" | "int" | "float"
    value: Any
    location: str  # file:line of the model code that asked
    source: str  # that line of code

    def to_dict(self) -> dict[str, Any]:
        value = self.value if isinstance(self.value, (bool, int, float)) else repr(self.value)
        return {"kind": self.kind, "value": value, "location": self.location, "source": self.source}


@dataclasses.dataclass
class TracedUNet:
    """A traced UNet: the fx graph plus everything needed to re-trace it or to call it."""

    gm: torch.fx.GraphModule
    input_names: tuple[str, ...]
    example_inputs: dict[str, torch.Tensor]
    granularity: Granularity
    model_class: str
    decisions: tuple[Decision, ...]
    spatial_multiple: int | None  # latent height/width must be a multiple of this (None: only the traced size)
    # modules of the model whose parameters the graph never uses (branches that run only with inputs the trace did
    # not pass, such as GLIGEN's grounding): qualified name -> parameter count
    outside: dict[str, int] = dataclasses.field(default_factory=dict)
    out_channels: int | None = None  # channels of the prediction on the example inputs

    @property
    def sample_channels(self) -> int:
        return int(self.example_inputs[self.input_names[0]].shape[1])

    @property
    def outside_params(self) -> int:
        return sum(self.outside.values())

    def validity(self) -> dict[str, Any]:
        shape = tuple(self.example_inputs[self.input_names[0]].shape)
        return {
            "traced_sample_shape": list(shape),
            "dynamic_batch": True,
            "spatial_multiple": self.spatial_multiple,
            "note": (
                f"valid for any batch and for latent height/width that are multiples of {self.spatial_multiple}"
                if self.spatial_multiple
                else f"valid for the traced latent size {shape[-2]}x{shape[-1]} only"
            ),
            "decisions": [d.to_dict() for d in self.decisions],
        }


class _ConcreteProxy(torch.fx.Proxy):
    """A proxy that can answer python's questions (bool, len, iter, int) from its example value."""

    def _concrete(self, kind: str) -> Any:
        return self.tracer.concretize(self, kind)

    def __bool__(self) -> bool:
        return bool(self._concrete("bool"))

    def __len__(self) -> int:
        value = self.tracer.value_of(self)
        if isinstance(value, torch.Tensor):
            raise torch.fx.proxy.TraceError(
                f"len() of a tensor bakes its batch size into the graph (node {self.node.name})"
            )
        return len(self._concrete("len"))

    def __iter__(self):
        value = self.tracer.value_of(self)
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([self[i] for i in range(len(value))])
        if isinstance(value, torch.Tensor):
            raise torch.fx.proxy.TraceError(
                f"iterating over a tensor bakes its batch size into the graph (node {self.node.name})"
            )
        return super().__iter__()

    def __int__(self) -> int:
        return int(self._concrete("int"))

    def __index__(self) -> int:
        return int(self._concrete("int"))

    def __float__(self) -> float:
        return float(self._concrete("float"))

    def __getattr__(self, k: str) -> torch.fx.proxy.Attribute:
        return _ConcreteAttribute(self, k)

    def __iadd__(self, other: Any) -> torch.fx.Proxy:
        # ``sample += x`` mutates a tensor that other names may still hold (diffusers' T2I-Adapter path adds to a down
        # block's output, which is also that block's skip): the graph stays functional, an add whose result every
        # later use of the old value takes instead, so the skip sees the sum as it does in eager PyTorch
        result = self.tracer.create_proxy("call_function", operator.add, (self, other), {})
        if isinstance(self.tracer.value_of(self), torch.Tensor):  # ints and tuples are values: nothing aliases them
            self.tracer.replaced[self.node] = result.node
        return result


class _ConcreteAttribute(torch.fx.proxy.Attribute, _ConcreteProxy):
    """``x.shape`` / ``x.ndim``: an attribute proxy that answers python's questions like any other."""


def _user_frame() -> tuple[str, str]:
    """The innermost stack frame that belongs to the model, not to torch or to this tracer."""
    for frame in reversed(traceback.extract_stack()):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_THIS_DIR) or filename.startswith(_TORCH_DIR) or "contextlib" in filename:
            continue
        source = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        return f"{_short_path(frame.filename)}:{frame.lineno}", source
    return "<unknown>", ""


def _short_path(filename: str) -> str:
    parts = os.path.normpath(filename).split(os.sep)
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    return "/".join(parts[-3:])


class OperatorTracer(torch.fx.Tracer):
    """fx tracer whose leaves are the operators of the chosen granularity and whose proxies are concrete."""

    def __init__(self, leaf_types: tuple[type, ...], example_inputs: Mapping[str, Any]):
        super().__init__(param_shapes_constant=True)
        self.leaf_types = leaf_types
        self.example_inputs = dict(example_inputs)
        self.values: dict[torch.fx.Node, Any] = {}
        self.decisions: list[Decision] = []
        self.replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # a value updated in place -> the node holding it now

    # --- leaves -----------------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    # --- concrete values -----------------------------------------------------------------------------------
    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ConcreteProxy(node, self)

    def value_of(self, proxy_or_node: Any) -> Any:
        node = proxy_or_node.node if isinstance(proxy_or_node, torch.fx.Proxy) else proxy_or_node
        return self.values[node]

    def concretize(self, proxy: torch.fx.Proxy, kind: str) -> Any:
        value = self.values[proxy.node]
        location, source = _user_frame()
        if isinstance(value, torch.Tensor):
            # a python decision on tensor *values* would bake one input's data into the graph
            raise torch.fx.proxy.TraceError(
                f"python needs a concrete {kind} of a tensor value (data-dependent control flow) at {location}: "
                f"`{source}`"
            )
        self.decisions.append(Decision(kind, len(value) if kind == "len" else value, location, source))
        return value

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if self.replaced:
            def latest(n: torch.fx.Node) -> torch.fx.Node:
                while n in self.replaced:
                    n = self.replaced[n]
                return n

            args, kwargs = torch.fx.node.map_arg(args, latest), torch.fx.node.map_arg(kwargs, latest)
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "get_attr":
            # fx makes get_attr nodes for buffers and tensor constants (FIR kernels, K-blocks) directly, without a
            # proxy: their values are read here, or later nodes would find nothing to compute with
            self.values[node] = self._evaluate(node)
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "output" or node in self.values:
            return proxy
        self.values[node] = self._evaluate(node)
        return proxy

    def _evaluate(self, node: torch.fx.Node) -> Any:
        def load(a):
            return self.values[a] if isinstance(a, torch.fx.Node) else a

        args = torch.fx.node.map_aggregate(node.args, load)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, load)
        # fx patches nn.Module.__call__/__getattr__ while tracing; the example values must be computed eagerly.
        with torch.no_grad(), _fx_patches_reverted():
            if node.op == "placeholder":
                if node.target not in self.example_inputs:
                    raise torch.fx.proxy.TraceError(f"no example input for forward argument {node.target!r}")
                return self.example_inputs[node.target]
            if node.op == "get_attr":
                obj: Any = self.root
                for atom in str(node.target).split("."):
                    obj = getattr(obj, atom)
                return obj
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
        raise AssertionError(node.op)


def _fx_patches_reverted() -> contextlib.AbstractContextManager:
    revert = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", None)
    if revert is None:  # private API: checked, so a torch upgrade fails with a clear message
        raise TraceError(
            f"torch {torch.__version__} lacks torch.fx._symbolic_trace._maybe_revert_all_patches, which the "
            "concrete tracer needs; ldpruner is tested with torch 2.13"
        )
    return revert()


@contextlib.contextmanager
def _proxies_are_tensors():
    """diffusers asks ``torch.is_tensor(timestep)``; a proxy must answer yes, or the timestep is baked in."""
    original = torch.is_tensor

    def is_tensor(obj: Any) -> bool:
        if isinstance(obj, _ConcreteProxy):
            return isinstance(obj.tracer.value_of(obj), torch.Tensor)
        return original(obj)

    torch.is_tensor = is_tensor
    try:
        yield
    finally:
        torch.is_tensor = original


def _make_forward(names: Sequence[str], call: Callable[..., Any]) -> Callable[..., Any]:
    """A forward with exactly these tensor arguments (fx makes one placeholder per argument)."""
    params = ", ".join(names)
    keywords = ", ".join(f"{n}={n}" for n in names)
    namespace: dict[str, Any] = {"_call": call}
    exec(f"def forward(self, {params}):\n    return _call(self, {keywords})\n", namespace)  # noqa: S102
    return namespace["forward"]


def _keyword_call(model_class: type) -> Callable[..., Any]:
    def call(self, **tensors):
        return model_class.forward(self, **tensors)

    return call


def _spatial_multiple(model: nn.Module) -> int | None:
    num_up = getattr(model, "num_upsamplers", None)
    if num_up is None:
        num_up = sum(1 for m in model.modules() if type(m).__name__ in ("Upsample2D", "FirUpsample2D", "KUpsample2D"))
    return 2**num_up


def trace_unet(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    *,
    granularity: str | Granularity = "block",
    copy_model: bool = True,
    extra_leaf_types: Sequence[type] = (),
) -> TracedUNet:
    """Trace a diffusers UNet2DModel / UNet2DConditionModel (or any fx-traceable nn.Module UNet).

    ``example_inputs`` maps forward-argument names to tensors; for diffusers UNets it defaults to
    :func:`unet_example_inputs`. The model is deep-copied first (``copy_model=False`` traces it in place and
    lets the graph share its modules). Raises :class:`TraceError` naming the model line that failed.
    """
    granularity = parse_granularity(granularity)
    if not isinstance(model, nn.Module):
        raise TraceError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    is_diffusers = _is_diffusers_unet(model)
    if example_inputs is None:
        if not is_diffusers:
            raise TraceError(
                f"{type(model).__name__} is not a diffusers UNet, so ldpruner cannot guess its inputs: "
                "pass example_inputs={argument name: tensor} for its forward"
            )
        example_inputs = unet_example_inputs(model)
    example_inputs = dict(example_inputs)

    was_training = model.training
    root = copy.deepcopy(model) if copy_model else model
    root.eval()
    if is_diffusers:
        residuals = residual_names(list(example_inputs))
        names = tuple(n for n in unet_input_names(model) if n in example_inputs)
        missing = [n for n in unet_input_names(model) if n not in example_inputs]
        if missing:
            raise TraceError(f"example_inputs lacks {missing}; "
                             f"{type(model).__name__} needs {list(unet_input_names(model))}")
        if residuals:  # ControlNet residuals: the down ones in skip order, then the mid one
            if MID_RESIDUAL not in example_inputs:
                raise TraceError(f"example_inputs has ControlNet residuals {residuals} but no {MID_RESIDUAL}")
            names = (*names, *residuals, MID_RESIDUAL)
        names = (*names, *residual_names(list(example_inputs), INTRA_RESIDUAL))  # T2I-Adapter features
        call = flat_call(type(root))
    else:
        params = tuple(inspect.signature(type(root).forward).parameters)[1:]
        unknown = [n for n in example_inputs if n not in params]
        if unknown:
            raise TraceError(f"example_inputs names {unknown} that {type(model).__name__}.forward does not take: "
                             f"{list(params)}")
        names = tuple(n for n in params if n in example_inputs)
        call = _keyword_call(type(root))
    # trace a subclass whose forward takes exactly the given tensors: no placeholders for optional inputs
    original_cls = type(root)
    root.__class__ = type(original_cls.__name__, (original_cls,), {"forward": _make_forward(names, call)})

    leaf_types = leaf_operator_types(granularity) + tuple(extra_leaf_types)
    tracer = OperatorTracer(leaf_types, example_inputs)
    try:
        with _proxies_are_tensors():
            graph = tracer.trace(root)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # any failure inside user code becomes one readable TraceError
        raise _trace_error(model, exc, is_diffusers) from exc
    finally:
        root.__class__ = original_cls
        if not copy_model and was_training:
            model.train()
    gm = torch.fx.GraphModule(root, graph, class_name=f"Traced{type(model).__name__}")
    gm.eval()
    return TracedUNet(
        gm=gm,
        input_names=names,
        example_inputs=example_inputs,
        granularity=granularity,
        model_class=type(model).__name__,
        decisions=tuple(tracer.decisions),
        spatial_multiple=_spatial_multiple(model) if is_diffusers else None,
        outside=_outside_graph(root, gm),
        out_channels=_out_channels(tracer, graph),
    )


def _out_channels(tracer: OperatorTracer, graph: torch.fx.Graph) -> int | None:
    (output,) = [n for n in graph.nodes if n.op == "output"]
    value = tracer.values.get(output.args[0]) if isinstance(output.args[0], torch.fx.Node) else None
    return int(value.shape[1]) if isinstance(value, torch.Tensor) and value.ndim >= 2 else None


def _outside_graph(root: nn.Module, gm: torch.fx.GraphModule) -> dict[str, int]:
    """The largest modules of ``root`` none of whose parameters the graph holds, with their parameter counts."""
    used = {id(p) for p in gm.parameters()}
    unused = {name for name, p in root.named_parameters() if id(p) not in used}
    if not unused:
        return {}
    out: dict[str, int] = {}
    for name, module in root.named_modules():
        params = [f"{name}.{n}" if name else n for n, _ in module.named_parameters()]
        if not name or not params or not all(p in unused for p in params):
            continue
        if any(name.startswith(f"{outer}.") for outer in out):
            continue
        out[name] = sum(p.numel() for p in module.parameters())
    # parameters held directly by a module the graph uses in part
    covered = {p for outer in out for p in unused if p.startswith(f"{outer}.")}
    for p in sorted(unused - covered):
        out[p] = root.get_parameter(p).numel()
    return out


def _is_diffusers_unet(model: nn.Module) -> bool:
    try:
        from diffusers import UNet2DConditionModel, UNet2DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, (UNet2DConditionModel, UNet2DModel))


def _trace_error(model: nn.Module, exc: BaseException, is_diffusers: bool) -> TraceError:
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(frames):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_THIS_DIR) or filename.startswith(_TORCH_DIR):
            continue
        where = f" at {_short_path(frame.filename)}:{frame.lineno} (`{(frame.line or '').strip()}`)"
        break
    message = f"could not trace {type(model).__name__}{where}: {type(exc).__name__}: {exc}"
    if is_diffusers:  # the user brought a config, not code: there is nothing for them to declare
        return TraceError(f"{message}; this {type(model).__name__} configuration is not supported")
    return TraceError(
        f"{message}. If the failing code is inside one module, declare that module's class a leaf "
        "(extra_leaf_types=[...]) so it is kept whole; data-dependent control flow cannot be traced."
    )
