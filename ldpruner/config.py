"""The configs of the two commands that compose the stages: ``ldpruner build`` (:class:`BuildConfig`) and
``ldpruner bench`` (:class:`BenchConfig`); TOML in, dict out.

Their fields reuse the stage options' declarations (:mod:`ldpruner.passes.config`) by name, so a default, a range
or a help text is written once. The field names are the CLI flags (``--num-samples`` ↔ ``num_samples``) and the
keywords of :func:`ldpruner.api.build` / :func:`ldpruner.api.bench`, so a TOML file, a command line and a Python
call say the same thing the same way.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from .devices import DEVICE_HELP
from .errors import ConfigError
from .options import Config, option, same_as, short_repr
from .passes.config import (
    AnalysisConfig,
    CostConfig,
    DeviceConfig,
    DistillConfig,
    ExportConfig,
    OptimizeConfig,
    PruneConfig,
    SelectionConfig,
    TraceConfig,
)

__all__ = ["ANALYSIS_OPTIONS", "DEFAULT_MODEL", "BenchConfig", "BuildConfig", "load_config"]

# the AnalysisConfig fields a caller sets (the latent size comes from the trace, the prompts from a file or the model)
ANALYSIS_OPTIONS = ("num_samples", "steps", "seed", "guidance_scale", "batch_size", "dtype")
# what `ldpruner build` prunes when given no MODEL: the embedded text-to-image model
DEFAULT_MODEL = "zoo:mnist-t2i"
MODEL_HELP = ("a local diffusers pipeline folder, a UNet folder, zoo:<name> (see `ldpruner zoo list`) or "
              "random:<family> (a published config with random weights)")


class _Composed(Config):
    """A config whose fields include other configs' fields; :meth:`part` builds one of those configs."""

    _not_parts: ClassVar[tuple[str, ...]] = ()

    def part(self, config: type[Config]) -> Any:
        own = set(self.names()) - set(self._not_parts)
        return config(**{n: getattr(self, n) for n in config.names() if n in own})

    def _part_problems(self, configs: Iterable[type[Config]]) -> Iterable[str]:
        for config in configs:
            try:
                self.part(config)
            except ConfigError as exc:
                yield str(exc).removeprefix(f"invalid {config.__name__}: ")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing and isinstance(data, Mapping) and not set(data) - set(cls.names()):
            raise ConfigError(f"{cls.__name__} needs {' and '.join(missing)} (a flag, a keyword or a config-file key)")
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class BuildConfig(_Composed):
    """Every knob of ``ldpruner build``: trace → analyze → select → prune → distill → export."""

    _not_parts = ("prompts",)  # a prompt file here, the prompts themselves in AnalysisConfig

    out: str = option(help="output folder: the artifacts of every stage, the report and the build state", flag=False,
                      path=True)
    model: str = option(DEFAULT_MODEL, MODEL_HELP, flag=False, path=True)
    overwrite: bool = option(False, "replace outputs whose inputs changed")
    granularity: str = same_as(TraceConfig, "granularity")
    height: int | None = same_as(TraceConfig, "height")
    width: int | None = same_as(TraceConfig, "width")
    num_samples: int = same_as(AnalysisConfig, "num_samples")
    steps: int = same_as(AnalysisConfig, "steps")
    seed: int = same_as(AnalysisConfig, "seed")
    guidance_scale: float = same_as(AnalysisConfig, "guidance_scale")
    batch_size: int | None = same_as(AnalysisConfig, "batch_size")
    dtype: str = same_as(AnalysisConfig, "dtype")
    device: str = same_as(DeviceConfig, "device")
    prompts: str | None = option(None, "text file with one prompt per line (blank and # lines skipped)",
                                 none="the model's own prompt set, else the built-in one", metavar="FILE", path=True)
    controlnet: bool = option(False, "the exported ONNX model also takes ControlNet's residuals "
                                     "(down_block_additional_residual_<i>, mid_block_additional_residual)")
    adapter: bool = option(False, "the exported ONNX model also takes T2I-Adapter's features "
                                  "(down_intrablock_additional_residual_<i>)")
    calibration: str | None = option(
        None, "safetensors file of calibration inputs named like Conditioning's fields (extra_channels: an "
        "inpainting UNet's masks and masked-image latents, class_labels, image_embeds …; rows first)",
        none="data-free defaults for every input (see README, MODEL)", metavar="FILE", path=True)
    scheduler: str | None = option(
        None, "the scheduler the analysis and distillation sample with, in place of the model's own: a diffusers "
        "scheduler class (DDIMScheduler, PNDMScheduler, DDPMScheduler, EulerDiscreteScheduler, ...) with its default "
        "config, or a scheduler folder or scheduler_config.json",
        none="the model's own (a pipeline folder's scheduler/); a model without one samples with DDIMScheduler() at "
             "diffusers' defaults, and says so", metavar="NAME", path=True)
    budget: float = same_as(SelectionConfig, "budget")
    metric: str = same_as(SelectionConfig, "metric")
    order: str = same_as(SelectionConfig, "order")
    runtime: str = same_as(CostConfig, "runtime")
    latency_batch: int | None = same_as(CostConfig, "latency_batch")
    latency_dtype: str = same_as(CostConfig, "latency_dtype")
    latency_repeats: int = same_as(CostConfig, "latency_repeats")
    latency_warmup: int = same_as(CostConfig, "latency_warmup")
    threads: int | None = same_as(DeviceConfig, "threads")
    latency_tolerance: float = same_as(CostConfig, "latency_tolerance")
    latency_precision: float = same_as(CostConfig, "latency_precision")
    target_tolerance: float = option(0.15, "the report calls the budget missed when the share removed (parameters "
                                     "or MACs counted, latency measured) is off the budget by more than this share "
                                     "of it, either way: too little, or more than asked", minimum=0, maximum=1)
    distill_steps: int = option(DistillConfig.default("steps"), "distillation steps after pruning, data-free on the "
                                "dense model's own trajectories (0 exports the pruned student undistilled)",
                                minimum=0)
    distill_options: Mapping[str, Any] = option(
        default_factory=dict, help="a DistillConfig field for the distillation (batch_size, trajectories, "
        "gradient_accumulation, gradient_checkpointing, ...; seed and guidance_scale default to the analysis')",
        items=DistillConfig, check=lambda value: _distill_option_problems(value))
    exporter: str = same_as(ExportConfig, "exporter")
    opset: int | None = same_as(ExportConfig, "opset")
    optimize: bool = same_as(OptimizeConfig, "optimize")
    fp16: bool = same_as(OptimizeConfig, "fp16")
    verify: bool = same_as(PruneConfig, "verify")
    samples: bool = option(True, "draw samples.png, the dense, pruned and distilled models on the same seeds (zoo "
                           "models); --no-samples skips it")

    def problems(self) -> Iterable[str]:
        yield from self._part_problems((AnalysisConfig, SelectionConfig, CostConfig, ExportConfig, OptimizeConfig))


@dataclasses.dataclass(frozen=True)
class BenchConfig(_Composed):
    """Every option of ``ldpruner bench`` (validated; written into report.json)."""

    models: tuple[str, ...] = option(help="the models to bench, one section each: " + MODEL_HELP + ", or a build "
                                     "folder (`ldpruner build --out`): that build's own plan, students and ONNX "
                                     "model, as they ship (the budgets, metric, order and the analysis and "
                                     "distillation options apply to models only)", nonempty=True,
                                     flag=False)
    out: str = option(help="output folder: report.json, report.md, plots, sample grids, artifacts", flag=False,
                      path=True)
    budgets: tuple[float, ...] = same_as(SelectionConfig, "budget", help="fractions of the metric to remove, one plan "
                                         "each", nonempty=True, default=(0.1, 0.2, 0.3, 0.4, 0.5))
    metric: str = same_as(SelectionConfig, "metric", help="what the budgets count")
    order: str = same_as(SelectionConfig, "order")
    runtime: str = same_as(CostConfig, "runtime", help="metric latency: the runtime the costs are measured and "
                           "predicted on (both are timed either way)")
    latency_tolerance: float = same_as(CostConfig, "latency_tolerance")
    latency_precision: float = same_as(CostConfig, "latency_precision")
    target_tolerance: float = same_as(BuildConfig, "target_tolerance")
    distill_steps: int = option(0, "also distil each pruned model this many steps", minimum=0)
    repeats: int = option(10, "timed rounds at least (each calls dense and pruned once); more until the ratio is "
                          "known to --latency-precision", minimum=1)
    warmup: int = option(3, "untimed calls per variant first", minimum=0)
    batch_sizes: tuple[int, ...] = option((1, 2), "latency batch sizes (2 = one guided step)", minimum=1,
                                          nonempty=True)
    quality: bool = option(True, "sample and score on the same seeds (zoo models with held-out real data: mnist-t2i, "
                           "crawl-tiles, espeak-digits)")
    samples: int = option(100, "samples per variant for quality", minimum=2)
    sample_steps: int = option(25, "scheduler steps per sample for quality", minimum=1)
    num_samples: int = same_as(AnalysisConfig, "num_samples", help="analysis: N samples for the LD score")
    steps: int = same_as(AnalysisConfig, "steps", help="analysis: scheduler steps per sample")
    batch_size: int | None = same_as(AnalysisConfig, "batch_size")
    dtype: str = same_as(AnalysisConfig, "dtype", help="analysis: " + AnalysisConfig.spec("dtype").help)
    device: str = same_as(DeviceConfig, "device", help="where the analysis, distillation and timings run: "
                          + DEVICE_HELP)
    threads: int | None = same_as(DeviceConfig, "threads")
    scheduler: str | None = same_as(BuildConfig, "scheduler")
    memory: bool = option(True, "measure ONNX peak memory in a fresh process per model")
    distill_options: Mapping[str, Any] = option(default_factory=dict, help="a DistillConfig field for the "
                                                "distillation (batch_size, lr, trajectories, ...)",
                                                items=DistillConfig,
                                                check=lambda value: _distill_option_problems(value))
    distill_data: str | None = option(None, "distil on this dataset folder (images; captions for text-to-image) "
                                      "through the model's VAE; one model per run", none="data-free",
                                      metavar="FOLDER", path=True)
    overwrite: bool = option(False, "replace an existing report")

    def problems(self) -> Iterable[str]:
        from collections import Counter

        counts = Counter(self.budgets)
        repeated = [f"{budget!r} ({n} times)" for budget, n in counts.items() if n > 1]
        if repeated:  # the repeated values only: a long list of budgets would make a long message
            more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
            yield f"budgets repeat {', '.join(repeated[:5])}{more}; give each budget once"
        if self.distill_data is not None:
            if len(self.models) != 1:
                yield (f"distill_data is one model's dataset; bench one model at a time with it "
                       f"(got {len(self.models)} models)")
            if not self.distill_steps:
                yield "distill_data needs distill_steps > 0"


def _distill_option_problems(value: Any) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"distill_options must be a mapping of DistillConfig fields, got {short_repr(value)}"]
    if "steps" in value:
        return ["distill_options may not set steps: distill_steps is the number of distillation steps"]
    try:
        DistillConfig.from_dict({"steps": 1, **value})
    except ConfigError as exc:
        return [f"distill_options: {exc}"]
    return []


def load_config(path: str | Path, **overrides: Any) -> BuildConfig:
    """Read a TOML build config (the keys of :class:`BuildConfig`); keyword overrides (the command line) win."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    return BuildConfig.from_dict(data)
