"""The configs of the commands: ``ldpruner build`` (:class:`BuildConfig`), ``ldpruner bench``
(:class:`BenchConfig`) and one option set per stage command (:class:`AnalyzeOptions` …); TOML in, dict out.

Each holds the stage configs of :mod:`ldpruner.passes.config` whole, as sections (``BuildConfig.analysis`` is an
``AnalysisConfig``), so a stage receives its config as it was validated, and a new field of a stage config reaches
every command holding it with no other edit. The flat names — a section's fields, ``distill_``-prefixed for the
distillation of build and bench — are the CLI flags (``--num-samples`` ↔ ``num_samples``), the keywords of the API
functions and the flat keys of a TOML file; a TOML file may also give a section as a table (``[analysis]``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ConfigError
from ldpruner.base.options import Config, option, section
from ldpruner.passes.config import (
    AnalysisConfig,
    CheckConfig,
    CostConfig,
    DeviceConfig,
    DistillConfig,
    ExportConfig,
    InputsConfig,
    OptimizeConfig,
    PruneConfig,
    SelectionConfig,
    TraceConfig,
)

__all__ = ["DEFAULT_MODEL", "AnalyzeOptions", "BenchConfig", "BuildConfig", "CostsOptions", "DistillOptions",
           "ExportOptions", "InspectOptions", "PruneOptions", "SelectOptions", "load_config"]

# what `ldpruner build` prunes when given no MODEL: the embedded text-to-image model
DEFAULT_MODEL = "zoo:mnist-t2i"
MODEL_HELP = ("a local diffusers pipeline folder, a UNet folder, zoo:<name> (see `ldpruner zoo list`) or "
              "random:<family> (a published config with random weights)")
# the flat names two sections declare, and the one each means: the latent size is the trace's (the analysis samples
# at the traced size), a prompt file is the inputs' (the analysis' prompts are read from it)
_CLASHES = {"height": "trace", "width": "trace", "prompts": "inputs"}
_DISTILL_HELP = "distillation"


@dataclasses.dataclass(frozen=True)
class BuildConfig(Config):
    """Every knob of ``ldpruner build``: trace → analyze → select → prune → distill → export, one section per stage
    config (``cfg.analysis`` is the AnalysisConfig the analysis runs with)."""

    clashes = _CLASHES
    mappings = {"distill_options": "distill"}

    out: str = option(help="output folder: the artifacts of every stage, the report and the build state", flag=False,
                      path=True)
    model: str = option(DEFAULT_MODEL, MODEL_HELP, flag=False, path=True)
    overwrite: bool = option(False, "replace outputs whose inputs changed")
    controlnet: bool = option(False, "the exported ONNX model also takes ControlNet's residuals "
                                     "(down_block_additional_residual_<i>, mid_block_additional_residual)")
    adapter: bool = option(False, "the exported ONNX model also takes T2I-Adapter's features "
                                  "(down_intrablock_additional_residual_<i>)")
    samples: bool = option(True, "draw samples.png, the dense, pruned and distilled models on the same seeds (zoo "
                           "models); --no-samples skips it")
    inputs: InputsConfig = section(InputsConfig)
    trace: TraceConfig = section(TraceConfig)
    analysis: AnalysisConfig = section(AnalysisConfig)
    selection: SelectionConfig = section(SelectionConfig)
    costs: CostConfig = section(CostConfig)
    check: CheckConfig = section(CheckConfig)
    prune: PruneConfig = section(PruneConfig)
    # data-free on the dense model's own trajectories, seeded and guided as the analysis unless told otherwise
    distill: DistillConfig = section(DistillConfig, prefix="distill", label=_DISTILL_HELP,
                                     inherit={"seed": "analysis", "guidance_scale": "analysis"})
    export: ExportConfig = section(ExportConfig)
    variants: OptimizeConfig = section(OptimizeConfig)
    placement: DeviceConfig = section(DeviceConfig)


@dataclasses.dataclass(frozen=True)
class BenchConfig(Config):
    """Every option of ``ldpruner bench`` (validated; written into report.json): the same stage configs as a
    build, one plan per budget."""

    clashes = _CLASHES
    mappings = {"distill_options": "distill"}

    models: tuple[str, ...] = option(help="the models to bench, one section each: " + MODEL_HELP + ", or a build "
                                     "folder (`ldpruner build --out`): that build's own plan, students and ONNX "
                                     "model, as they ship (the budgets, metric, order and the analysis and "
                                     "distillation options apply to models only)", nonempty=True,
                                     flag=False)
    out: str = option(help="output folder: report.json, report.md, plots, sample grids, artifacts", flag=False,
                      path=True)
    budgets: tuple[float, ...] = option((0.1, 0.2, 0.3, 0.4, 0.5), "fractions of the metric to remove, one plan "
                                        "each", nonempty=True, minimum=0, maximum=1, exclusive_minimum=True,
                                        exclusive_maximum=True, hint="e.g. 0.3 removes 30 %")
    repeats: int = option(10, "timed rounds at least (each calls dense and pruned once); more until the ratio is "
                          "known to --latency-precision", minimum=1)
    warmup: int = option(3, "untimed calls per variant first", minimum=0)
    batch_sizes: tuple[int, ...] = option((1, 2), "latency batch sizes (2 = one guided step)", minimum=1,
                                          nonempty=True)
    quality: bool = option(True, "sample and score on the same seeds (zoo models with held-out real data: mnist-t2i, "
                           "crawl-tiles, espeak-digits)")
    samples: int = option(100, "samples per variant for quality", minimum=2)
    sample_steps: int = option(25, "scheduler steps per sample for quality", minimum=1)
    memory: bool = option(True, "measure ONNX peak memory in a fresh process per model")
    distill_data: str | None = option(None, "distil on this dataset folder (images; captions for text-to-image) "
                                      "through the model's VAE; one model per run", none="data-free",
                                      metavar="FOLDER", path=True)
    overwrite: bool = option(False, "replace an existing report")
    inputs: InputsConfig = section(InputsConfig)
    trace: TraceConfig = section(TraceConfig)
    analysis: AnalysisConfig = section(AnalysisConfig, label="analysis")
    selection: SelectionConfig = section(SelectionConfig, hide=("budget",))  # the budgets are bench's own
    costs: CostConfig = section(CostConfig, label="metric latency")
    check: CheckConfig = section(CheckConfig)
    prune: PruneConfig = section(PruneConfig)
    distill: DistillConfig = section(DistillConfig, prefix="distill", defaults={"steps": 0}, label=_DISTILL_HELP)
    export: ExportConfig = section(ExportConfig)
    placement: DeviceConfig = section(DeviceConfig)

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
            if not self.distill.steps:
                yield "distill_data needs distill_steps > 0"


# --- the options of one stage's API function and command: the stage configs it takes, by their flat names ----------

@dataclasses.dataclass(frozen=True)
class InspectOptions(Config):
    label = ""
    trace: TraceConfig = section(TraceConfig)
    placement: DeviceConfig = section(DeviceConfig, only=("threads",))  # the trace runs the model once


@dataclasses.dataclass(frozen=True)
class AnalyzeOptions(Config):
    label = ""
    clashes = {"height": "trace", "width": "trace"}  # the analysis samples at the traced size
    trace: TraceConfig = section(TraceConfig)
    analysis: AnalysisConfig = section(AnalysisConfig)
    placement: DeviceConfig = section(DeviceConfig)


@dataclasses.dataclass(frozen=True)
class CostsOptions(Config):
    label = ""
    trace: TraceConfig = section(TraceConfig)  # the latent size deployed
    costs: CostConfig = section(CostConfig)
    placement: DeviceConfig = section(DeviceConfig)  # what the latency is measured with: part of the costs' key


@dataclasses.dataclass(frozen=True)
class SelectOptions(Config):
    label = ""
    selection: SelectionConfig = section(SelectionConfig)
    # with --model the plan's joint score and the set search run the model where the analysis ran it
    placement: DeviceConfig = section(DeviceConfig)


@dataclasses.dataclass(frozen=True)
class PruneOptions(Config):
    label = ""
    trace: TraceConfig = section(TraceConfig, only=("height", "width"))  # the granularity is the plan's
    prune: PruneConfig = section(PruneConfig)
    placement: DeviceConfig = section(DeviceConfig, only=("threads",))  # the trace and the verifier run the model


@dataclasses.dataclass(frozen=True)
class DistillOptions(Config):
    label = ""
    distill: DistillConfig = section(DistillConfig)
    placement: DeviceConfig = section(DeviceConfig)

    def problems(self) -> Iterable[str]:
        if self.distill.steps == 0:
            yield "steps=0 must be >= 1 (distill trains at least one step; build and bench take 0 for none)"


@dataclasses.dataclass(frozen=True)
class ExportOptions(Config):
    label = ""
    export: ExportConfig = section(ExportConfig)
    variants: OptimizeConfig = section(OptimizeConfig)
    placement: DeviceConfig = section(DeviceConfig)
    trace: TraceConfig = section(TraceConfig, only=("height", "width"))  # a dense model's traced latent size


def load_config(path: str | Path, **overrides: Any) -> BuildConfig:
    """Read a TOML build config — flat keys (the flags' names: ``num_samples = 8``), sections (``[analysis]``,
    ``[distill]`` … with the fields' own names) or both; keyword overrides (the command line) win."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    merged = BuildConfig.nest(data)
    for key, value in BuildConfig.nest({k: v for k, v in overrides.items() if v is not None}).items():
        merged[key] = {**merged.get(key, {}), **value} if key in BuildConfig.sections() else value
    return BuildConfig.from_dict(merged)
