"""Model sources: what a MODEL argument names, loaded — a local diffusers pipeline folder, a UNet folder,
``zoo:<name>`` (an embedded trained model, :mod:`ldpruner.zoo`) or ``random:<family>`` (a published config with
random weights, :mod:`ldpruner.sources.families`) — as a :class:`LoadedModel`: the UNet with what the stages need
beside it (the pipeline's scheduler, its text encoder, the model's own prompts).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.base.fingerprint import weights_fingerprint
from ldpruner.base.io import json_safe, read_json

__all__ = ["RANDOM_PREFIX", "UNET_CLASSES", "ZOO_PREFIX", "LoadedModel", "load", "scheduler_named", "weights_id"]

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
RANDOM_PREFIX = "random:"
ZOO_PREFIX = "zoo:"
CLIP_TEXT_LENGTH = 77  # the tokens a Stable Diffusion pipeline's CLIP tokenizer pads every prompt to
# pipelines that pad prompts to 77 tokens whatever their tokenizer declares (DeepFloyd IF's T5, Kandinsky's M-CLIP)
_PADS_TO_77 = ("IF", "Kandinsky")


@dataclasses.dataclass
class LoadedModel:
    unet: nn.Module
    scheduler: Any | None  # a diffusers scheduler: the pipeline folder's, or the one --scheduler names; or None
    source: str  # what the user passed, for reports
    unet_dir: Path | None  # folder holding the UNet's config.json (None for in-memory / random models)
    pipeline_dir: Path | None
    random_weights: bool = False
    text_encoder_config: Path | None = None  # zoo text-to-image models: the frozen text encoder they were trained with
    default_prompts: tuple[str, ...] | None = None  # the model's own calibration prompts (prompts.txt beside it)
    # a safetensors file of calibration inputs the user gave (extra channels, class labels …; see
    # ldpruner.passes.conditioning.read_calibration_file): the analysis and distillation condition on them
    calibration: Path | None = None
    # loaded here from a path or spec (True), or a caller's module (False): only an owned UNet may be traced without
    # a copy (the graph then shares its modules; rewrites always work on copies) or used as a frozen teacher
    owned: bool = True
    # where ``scheduler`` came from: "model" (the pipeline folder's scheduler/), "asked" (--scheduler); None: a
    # scheduler a caller put here, or none
    scheduler_source: str | None = None
    # a pipeline folder without scheduler/scheduler_config.json: the folder it lacks (the stages that sample refuse
    # such a model unless --scheduler names one; the others do not need a scheduler)
    missing_scheduler: Path | None = None
    default_scheduler_noted: bool = False  # the notice that it samples with the default scheduler was given
    _description: dict[str, Any] | None = dataclasses.field(default=None, init=False, repr=False)
    _weights_id: str | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def weights_id(self) -> str:
        """The identity of the loaded UNet's weights (:func:`weights_id`), computed once: every artifact made for
        this model records it, and a stage given an artifact made for other weights refuses it."""
        if self._weights_id is None:
            self._weights_id = weights_id(self.unet)
        return self._weights_id

    @property
    def zoo_name(self) -> str | None:
        """The registry name of a zoo model (``zoo:<name>``), else None."""
        return self.source.removeprefix(ZOO_PREFIX) if self.source.startswith(ZOO_PREFIX) else None

    @property
    def pipeline_text_encoder(self) -> Path | None:
        """The pipeline folder when it has a text encoder (tokenizer/ + text_encoder/) to encode prompts with."""
        if self.pipeline_dir is not None and (self.pipeline_dir / "text_encoder").is_dir():
            return self.pipeline_dir
        return None

    @property
    def text_length(self) -> int:
        """How many tokens the model's pipeline gives the UNet (``encoder_hidden_states``' second dimension): the
        zoo text encoder's ``max_length``; 77 for the pipelines that pad to it whatever their tokenizer says (IF,
        Kandinsky); else the length the pipeline's tokenizer pads to (its ``model_max_length``); else CLIP's 77,
        which every Stable Diffusion pipeline uses. The trace, the export's
        validation and every latency measurement run at this length; the exported graph takes any."""
        if self.text_encoder_config is not None:
            length = read_json(self.text_encoder_config, what="text encoder description",
                               error=ModelLoadError).get("max_length")
            if _token_count(length):
                return length
        if self.pipeline_dir is not None:
            config = self.pipeline_dir / "tokenizer" / "tokenizer_config.json"
            pipeline = read_json(self.pipeline_dir / "model_index.json", what="pipeline index",
                                 error=ModelLoadError).get("_class_name")
            if isinstance(pipeline, str) and pipeline.startswith(_PADS_TO_77):
                return CLIP_TEXT_LENGTH
            if config.is_file():
                length = read_json(config, what="tokenizer config", error=ModelLoadError).get("model_max_length")
                if _token_count(length):
                    return length
        return CLIP_TEXT_LENGTH

    @property
    def unet_config(self) -> dict[str, Any] | None:
        """The diffusers config of the UNet as plain JSON values (None for a module without one)."""
        return json_safe(dict(self.unet.config)) if hasattr(self.unet, "config") else None

    @property
    def device(self) -> Any:
        return next(self.unet.parameters()).device

    def placed(self, device: Any, dtype: Any) -> nn.Module:
        """The UNet on ``device`` in ``dtype``: the loaded module itself when it is there already, else a cast copy
        (:func:`ldpruner.base.devices.cast_copy`: the loaded weights stay as they are, at their precision)."""
        import torch

        from ldpruner.base.devices import cast_copy

        param = next(self.unet.parameters())
        if param.device == torch.device(device) and param.dtype == dtype:
            return self.unet
        return cast_copy(self.unet, device, dtype)

    def trace(self, config: Any = None, *, unet: nn.Module | None = None) -> Any:
        """The UNet (or ``unet``, a placed copy of it) traced into a :class:`~ldpruner.compiler.tracer.TracedUNet`
        at ``config`` (a :class:`~ldpruner.passes.config.TraceConfig`; None: block granularity at the UNet's
        sample_size), from seeded example inputs of batch 2 on its device, in its dtype. A caller's module is
        traced through a copy; one loaded here, or a placed copy, is shared with the graph (never changed by it)."""
        from ldpruner.compiler.tracer import trace_unet, unet_example_inputs
        from ldpruner.passes.config import TraceConfig

        config = config if config is not None else TraceConfig()
        module = unet if unet is not None else self.unet
        inputs = unet_example_inputs(module, batch=2, height=config.height, width=config.width,
                                     seq_len=self.text_length)
        return trace_unet(module, inputs, granularity=config.granularity,
                          copy_model=module is self.unet and not self.owned)

    def trace_like(self, traced: Any, *, share: bool = False, unet: nn.Module | None = None) -> Any:
        """The UNet (or ``unet``, a placed copy of it, shared with the graph) traced exactly like ``traced`` (same
        inputs, shapes and granularity; the inputs in the module's dtype, on its device): the dense teacher of a
        student that was pruned from a trace of this model. ``share`` (an owned UNet only) lets the teacher graph
        use the loaded modules instead of a copy: no second copy of the weights, but whatever the teacher's user
        does to them (freezing, moving) happens to the loaded UNet."""
        from ldpruner.compiler.tracer import trace_unet

        module = unet if unet is not None else self.unet
        param = next(module.parameters())
        inputs = {n: traced.example_inputs[n] for n in traced.input_names}
        inputs = {n: t.to(param.device, param.dtype if t.is_floating_point() else t.dtype) for n, t in inputs.items()}
        return trace_unet(module, inputs, granularity=traced.granularity.value,
                          copy_model=unet is None and not (share and self.owned))

    def release(self) -> None:
        """Let the UNet go (a build, once no stage needs the dense model any more); using it afterwards is an error,
        its description stays."""
        self._description = self.describe()
        _ = self.weights_id  # the identity stays known: the report and the export record it
        self.unet = None  # type: ignore[assignment]

    def describe(self) -> dict[str, Any]:
        if self.unet is None:
            return self._description
        return {
            "source": self.source,
            "class": type(self.unet).__name__,
            "unet_dir": str(self.unet_dir) if self.unet_dir else None,
            "pipeline_dir": str(self.pipeline_dir) if self.pipeline_dir else None,
            "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
            # where the scheduler the passes sample with comes from (ldpruner.passes.inputs.SCHEDULER_SOURCES)
            "scheduler_source": (self.scheduler_source or "given") if self.scheduler is not None else "default",
            "random_weights": self.random_weights,
            "text_encoder": str(self.text_encoder_config) if self.text_encoder_config else None,
            "text_length": self.text_length,
            "weights": self.weights_id,
        }


def _token_count(value: Any) -> bool:
    """Whether a tokenizer's length is a real one (transformers writes a huge sentinel for "no limit")."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096


def weights_id(module: nn.Module) -> str:
    """``sha256:<hex>`` over ``module``'s state_dict (every tensor's name, dtype, shape and bytes): the same weights
    loaded from the same files give the same identity; other weights of the same architecture, or the same weights
    cast to another dtype, another."""
    return "sha256:" + weights_fingerprint(module)


def load(model: str | os.PathLike | nn.Module | LoadedModel, *, scheduler: str | os.PathLike | None = None
         ) -> LoadedModel:
    """Load a UNet (and the pipeline's scheduler when there is one) from what the user named. ``scheduler``
    (:func:`scheduler_named`: a diffusers scheduler class, or a scheduler folder or config file) replaces the model's
    own, or gives one to a model that has none; a LoadedModel passed in stays as it was."""
    loaded = _load(model)
    if scheduler is None:
        return loaded
    asked = dataclasses.replace(loaded, scheduler=scheduler_named(scheduler), scheduler_source="asked",
                                missing_scheduler=None)
    asked._weights_id = loaded._weights_id  # the same UNet: its identity is known already
    return asked


def _load(model: str | os.PathLike | nn.Module | LoadedModel) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(unet=model, scheduler=None, source=f"<{type(model).__name__} object>",
                           unet_dir=None, pipeline_dir=None, owned=False)
    spec = os.fspath(model)
    if spec.startswith(RANDOM_PREFIX):
        return _random_model(spec)
    if spec.startswith(ZOO_PREFIX):
        return _zoo_model(spec)
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(
            f"model path {spec!r} does not exist; pass a local diffusers pipeline folder (with model_index.json), "
            f"a UNet folder (with config.json), or {RANDOM_PREFIX}<family> for a published config with random weights"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {spec!r} is a file; "
                             "pass the folder that holds config.json or model_index.json")
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        if not (unet_dir / "config.json").is_file():
            raise ModelLoadError(f"pipeline folder {spec!r} has no unet/config.json; "
                                 "ldpruner prunes the pipeline's UNet")
        unet = _load_unet(unet_dir)
        scheduler = _load_scheduler(path)
        return LoadedModel(unet=unet, scheduler=scheduler, source=spec, unet_dir=unet_dir, pipeline_dir=path,
                           scheduler_source="model" if scheduler is not None else None,
                           missing_scheduler=path / "scheduler" if scheduler is None else None)
    if (path / "config.json").is_file():
        return LoadedModel(unet=_load_unet(path), scheduler=None, source=spec, unet_dir=path, pipeline_dir=None)
    raise ModelLoadError(
        f"{spec!r} is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)"
    )


def _load_unet(folder: Path) -> nn.Module:
    import diffusers

    config = read_json(folder / "config.json", what="UNet config", error=ModelLoadError)
    class_name = config.get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ModelLoadError(
            f"{str(folder)!r} holds a {class_name or 'model without _class_name'}, not a UNet; "
            f"ldpruner prunes {' or '.join(UNET_CLASSES)} (for a pipeline, pass the pipeline folder)"
        )
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {pickles}: convert them to safetensors; ldpruner never loads pickles)" if pickles else ""
        raise ModelLoadError(f"no .safetensors weights in {str(folder)!r}{hint}")
    cls = getattr(diffusers, class_name)
    try:
        unet, info = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                         output_loading_info=True)
    except Exception as exc:  # diffusers raises many kinds for a corrupt file; one typed error for the user
        raise ModelLoadError(f"cannot load {class_name} weights from {str(folder)!r}: {_load_failure(exc)}") from exc
    # diffusers initialises weights the file lacks (randomly, or not at all: on the meta device) with a warning only
    for kind, what in (("missing_keys", "config.json asks for weights the files lack"),
                       ("unexpected_keys", "the files hold weights config.json has no place for")):
        names = sorted(info.get(kind) or [])
        if names:
            raise ModelLoadError(f"cannot load {class_name} weights from {str(folder)!r}: {what} ({len(names)}, e.g. "
                                 f"{names[0]}); config.json does not describe these weights (edited, or from another "
                                 "model): restore the config.json saved with them")
    return unet.eval()


def _load_failure(exc: Exception) -> str:
    """What went wrong loading weights, in a line: a shape mismatch says which tensor and that config.json does not
    describe the weights (diffusers' advice, to re-initialise the mismatched weights, is not what a pruner wants)."""
    import re

    text = " ".join(str(exc).split())
    mismatch = re.search(r"because (\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\("
                         r"(\[[^\]]*\])\)", text)
    if mismatch:
        name, expected, got = mismatch.groups()
        return (f"{name} is {got} in the weights but config.json makes it {expected}; config.json does not describe "
                "these weights (edited, or from another model): restore the config.json saved with them")
    text = text.split(" If you want to instead overwrite", 1)[0]
    return f"{type(exc).__name__}: {text if len(text) <= 300 else text[:300] + ' …'}"


def _load_scheduler(pipeline_dir: Path) -> Any | None:
    config_path = pipeline_dir / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        return None
    return _scheduler_from(config_path)


def _scheduler_from(config_path: Path) -> Any:
    """The scheduler a ``scheduler_config.json`` describes (its ``_class_name`` with its config)."""
    config = read_json(config_path, what="scheduler config", error=ModelLoadError)
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    cls = _scheduler_class(str(class_name))
    if cls is None:
        raise ModelLoadError(f"unknown scheduler class {class_name!r} in {str(config_path)!r}")
    if config_path.name == "scheduler_config.json":
        return cls.from_pretrained(config_path.parent, local_files_only=True)
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _scheduler_class(name: str) -> Any | None:
    """diffusers' scheduler class called ``name`` (a SchedulerMixin), or None."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) else None


def scheduler_named(spec: str | os.PathLike) -> Any:
    """The scheduler ``--scheduler`` names: a diffusers scheduler class (``DDIMScheduler``, ``PNDMScheduler``, …)
    with its default config, or a scheduler folder (holding ``scheduler_config.json``) or such a config file."""
    text = os.fspath(spec)
    cls = _scheduler_class(text)
    if cls is not None:
        try:
            return cls()
        except Exception as exc:  # a class that needs arguments: name its folder instead
            raise ConfigError(f"scheduler={text!r}: {text}() with its default config fails ({type(exc).__name__}: "
                              f"{exc}); pass a scheduler folder or scheduler_config.json instead") from exc
    path = Path(text)
    if path.is_dir():
        if not (path / "scheduler_config.json").is_file():
            raise ModelLoadError(f"scheduler={text!r} is a folder without scheduler_config.json; pass a scheduler "
                                 "folder as diffusers saves one, or a scheduler class such as DDIMScheduler")
        return _scheduler_from(path / "scheduler_config.json")
    if path.is_file():
        return _scheduler_from(path)
    raise ConfigError(f"scheduler={text!r} is neither a diffusers scheduler class (DDIMScheduler, PNDMScheduler, "
                      "DDPMScheduler, EulerDiscreteScheduler, ...) nor a scheduler folder or scheduler_config.json")


def _zoo_model(spec: str) -> LoadedModel:
    from ldpruner import zoo

    folder = zoo.model_dir(spec[len(ZOO_PREFIX):])
    loaded = load(folder)
    loaded.source = spec
    text_encoder = folder / "text_encoder.json"
    loaded.text_encoder_config = text_encoder if text_encoder.is_file() else None
    prompts = folder / "prompts.txt"
    if prompts.is_file():
        loaded.default_prompts = tuple(p.strip() for p in prompts.read_text().splitlines() if p.strip())
    return loaded


def _random_model(spec: str) -> LoadedModel:
    from ldpruner.sources import families

    name = spec[len(RANDOM_PREFIX):]
    if name not in families.FAMILIES:
        raise ModelLoadError(f"unknown family {name!r} in {spec!r}; known: {sorted(families.FAMILIES)}")
    unet = families.build_unet(name, reduced=False, seed=0)
    return LoadedModel(unet=unet.eval(), scheduler=None, source=spec, unet_dir=None, pipeline_dir=None,
                       random_weights=True)
