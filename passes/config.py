"""The options of every pass, declared once (default, meaning, valid values): tracing, the analysis, selection, the
rewrite, the latency cost model, distillation, ONNX export and onnxruntime optimization.

The passes take these configs; the API takes their fields as keywords, ``ldpruner build`` composes them
(:mod:`ldpruner.stages.config`) and the CLI makes its flags from them (:func:`ldpruner.base.flags.add_flags`). This
module imports no third-party package, so the command line can read it without loading torch.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from typing import Any

from ldpruner.base.devices import DEVICE_HELP, DTYPES, THREADS_HELP, check_device
from ldpruner.base.errors import ConfigError
from ldpruner.base.options import Config, option
from ldpruner.compiler.operators import Granularity

__all__ = [
    "DEFAULT_TOLERANCES",
    "AnalysisConfig",
    "CheckConfig",
    "CostConfig",
    "DeviceConfig",
    "DistillConfig",
    "ExportConfig",
    "InputsConfig",
    "OptimizeConfig",
    "PruneConfig",
    "SelectionConfig",
    "Tolerance",
    "TraceConfig",
]

_MAX_SEED = 2**32
_MAX_SAMPLES = 2**20  # step-noise seeds are (seed << 20) + i + 1; see AnalysisConfig


@dataclasses.dataclass(frozen=True)
class TraceConfig(Config):
    """How a UNet becomes a graph of operators: which modules are operators, and the latent size of the trace."""

    granularity: str = option("block", "operator granularity: whole ResNet/transformer blocks, or each transformer's "
                              "self-attention, cross-attention and feed-forward",
                              choices=tuple(g.value for g in Granularity))
    height: int | None = option(None, "latent height to trace and sample at", minimum=1,
                                none="the UNet's sample_size")
    width: int | None = option(None, "latent width to trace and sample at", minimum=1, none="the UNet's sample_size")


@dataclasses.dataclass(frozen=True)
class DeviceConfig(Config):
    """Where a stage runs: the analysis, distillation, the export's numeric check and the bench's timings — on which
    device, with how many CPU threads (torch's intra-op threads for the stage, and every onnxruntime session it
    opens; the number used is recorded in the stage's artifact)."""

    device: str = option("auto", "where the work runs: " + DEVICE_HELP, check=check_device)
    threads: int | None = option(None, THREADS_HELP, minimum=1,
                                 none="the CPUs this process may use (affinity and cgroup quota) less those other "
                                      "jobs keep busy when it starts, at least 1, at most torch's own setting")


@dataclasses.dataclass(frozen=True)
class InputsConfig(Config):
    """What a model is conditioned and sampled with beside its UNet, where its own is not wanted: prompts, other
    calibration inputs, the scheduler."""

    prompts: str | None = option(None, "text file with one prompt per line (blank and # lines skipped)",
                                 none="the model's own prompt set, else the built-in one", metavar="FILE", path=True)
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


@dataclasses.dataclass(frozen=True)
class AnalysisConfig(Config):
    """How the analysis samples.

    * ``num_samples`` N ≥ 2: latents per model; μ and σ are taken over them.
    * ``steps``: scheduler steps per generation.
    * ``seed``: the initial noise is ``torch.randn((N, C, H, W), generator=torch.Generator().manual_seed(seed))``;
      schedulers that draw noise in ``step`` get one CPU generator per sample, seeded ``(seed << 20) + i + 1``,
      so a sample's trajectory does not depend on ``batch_size``. Random embeddings (no text encoder) are
      seeded with ``seed`` too.
    * ``height`` / ``width``: latent size; None means the size the UNet was traced at.
    * ``guidance_scale``: classifier-free guidance for conditional UNets (≤ 1 disables it); ignored for
      unconditional ones.
    * ``batch_size``: samples per UNet call (None: all N at once); with guidance the UNet sees twice as many.
      μ and σ accumulate in float64 as micro-batches stream, so memory holds one micro-batch of activations.
    * ``dtype``: the dtype the UNet is scored in (its weights and activations); the API casts a copy of the model.
    * ``prompts``: prompts for the text-encoder path (None: the built-in prompt set); sample i uses prompt
      ``i % len(prompts)``.
    """

    num_samples: int = option(8, "N samples per model: the LD score's mean and std are taken over them",
                              minimum=2, maximum=_MAX_SAMPLES - 1, hint="σ over fewer than 2 samples is always 0")
    steps: int = option(10, "scheduler steps per sample", minimum=1)
    seed: int = option(0, "seed of the initial noise (and of random embeddings)", minimum=0, maximum=_MAX_SEED - 1)
    height: int | None = option(None, "latent height of the analysis", minimum=1, none="the traced size", flag=False)
    width: int | None = option(None, "latent width of the analysis", minimum=1, none="the traced size", flag=False)
    guidance_scale: float = option(7.5, "classifier-free guidance of text-to-image models (<= 1 disables it)",
                                   minimum=0)
    batch_size: int | None = option(None, "analysis: samples per UNet call (x2 with guidance); bounds its memory",
                                    minimum=1, none="all samples at once")
    prompts: tuple[str, ...] | None = option(None, "prompts of the text-encoder path", nonempty=True,
                                             none="the built-in prompt set", flag=False)
    dtype: str = option("float32", "dtype the UNet is scored in (weights and activations; the statistics "
                        "accumulate in float64)", choices=DTYPES)

    def problems(self) -> Iterable[str]:
        if self.prompts is not None and not all(p.strip() for p in self.prompts):
            yield f"prompts={list(self.prompts)!r} must be non-empty strings"


METRICS = ("params", "macs", "latency")
ORDERS = ("score", "score-per-cost", "knapsack", "greedy")
RUNTIMES = ("onnxruntime", "torch")


@dataclasses.dataclass(frozen=True)
class SelectionConfig(Config):
    """``budget``: fraction of ``metric`` to remove. ``order``: ranking rule."""

    budget: float = option(0.3, "fraction of the metric to remove", minimum=0, maximum=1, exclusive_minimum=True,
                           exclusive_maximum=True, hint="e.g. 0.3 removes 30 %")
    metric: str = option("params", "what the budget counts: UNet parameters, multiply-accumulates per sample, or "
                         "the dense model's latency on the target runtime (measured per operator: costs.json)",
                         choices=METRICS)
    order: str = option("score", "selection rule: lowest LD score first, lowest score per unit of the metric first, "
                        "the exact knapsack (the least total LD score that reaches the budget), or greedy: the set "
                        "search, which scores the removed set as it grows (needs the model; UNet calls)",
                        choices=ORDERS)
    shortlist: int | None = option(None, "set search: the candidates it re-scores at each step (the lowest one-shot "
                                   "score per unit of the metric first)", minimum=1,
                                   none="as many as let the search finish within --search-cap")
    search_cap: float = option(6.0, "set search: the most UNet calls it may make, in one-shot analyses; at the cap the "
                               "plan is finished in score-per-cost order (and says so)", minimum=0,
                               exclusive_minimum=True)


@dataclasses.dataclass(frozen=True)
class CostConfig(Config):
    """How the latency cost of each operator is measured: on which runtime, at which batch and dtype, how often.
    The latent size is the trace's; the device and the threads are the stage's (:class:`DeviceConfig`)."""

    runtime: str = option("onnxruntime", "where latency is measured and predicted: onnxruntime (the exported "
                          "model; the CUDA provider on a GPU) or torch eager", choices=RUNTIMES)
    latency_batch: int | None = option(None, "UNet batch the latency is measured at", minimum=1,
                                       none="2 for a text-conditioned UNet (one guided step), else 1")
    latency_dtype: str = option("float32", "dtype the torch runtime is timed in (onnxruntime times the float32 "
                                "export)", choices=DTYPES)
    latency_repeats: int = option(10, "timed runs of the dense model (per-operator times are their medians)",
                                  minimum=1)
    latency_warmup: int = option(2, "untimed runs first", minimum=0)

    def problems(self) -> Iterable[str]:
        if self.runtime == "onnxruntime" and self.latency_dtype != "float32":
            yield (f"latency_dtype={self.latency_dtype!r} with runtime='onnxruntime': onnxruntime is timed on the "
                   "float32 export; use runtime='torch' for another dtype")


@dataclasses.dataclass(frozen=True)
class CheckConfig(Config):
    """How a plan's result is judged once it is pruned: its measured latency against the cut the costs predicted,
    and the share it removed against the budget asked."""

    latency_tolerance: float = option(0.15, "flag a plan whose measured latency cut falls short of the predicted "
                                      "cut by more than this share of it", minimum=0, maximum=1)
    latency_precision: float = option(0.02, "time a plan beside the dense model until the 95 % interval of their "
                                      "latency ratio lies within ± this share of it (at most 400 rounds or 1 "
                                      "minute; the record says whether it got there)", minimum=0, maximum=1,
                                      exclusive_minimum=True, exclusive_maximum=True)
    target_tolerance: float = option(0.15, "the report calls the budget missed when the share removed (parameters "
                                     "or MACs counted, latency measured) is off the budget by more than this share "
                                     "of it, either way: too little, or more than asked", minimum=0, maximum=1)


@dataclasses.dataclass(frozen=True)
class PruneConfig(Config):
    """The rewrite's own option: whether the pass manager runs the verifier after it."""

    verify: bool = option(True, "verify the rewritten graph after each pass (graph lint, a run on the example "
                          "inputs, the dense output shape)")


FEATURE_LOSSES = ("normalized", "mse")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "adafactor")
DEFAULT_LR = {"adamw": 5e-4, "adafactor": 1e-2}


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """How to distill. ``batch_size`` is the global batch (split evenly over ranks). ``w_task`` None means
    1.0 when the data knows the true noise and 0 otherwise. Data-free fields: ``trajectories`` seeded teacher
    samplings of ``trajectory_steps`` steps with ``guidance_scale``, ``renoise`` share of each batch re-noised
    from the teacher's final latents."""

    steps: int = option(200, "training steps (build and bench: 0 keeps the pruned student undistilled)", minimum=0)
    batch_size: int = option(16, "global batch, split over processes", minimum=1)
    optimizer: str = option("adamw", "AdamW (two moments per weight: twice the student's size in memory), or "
                            "Adafactor (factored second moments, no first: a quarter of AdamW's state for SD 1.5, "
                            "a twentieth for SDXL)",
                            choices=OPTIMIZERS)
    lr: float | None = option(None, "peak learning rate (Adafactor's is relative to each weight's RMS)", minimum=0,
                              exclusive_minimum=True, none="5e-4 with AdamW, 1e-2 with Adafactor")
    lr_schedule: str = option("cosine", "decay after warm-up", choices=LR_SCHEDULES)
    warmup_steps: int = option(20, "linear warm-up steps", minimum=0)
    min_lr_ratio: float = option(0.1, "the learning rate decays to this share of its peak", minimum=0, maximum=1)
    weight_decay: float = option(0.0, "weight decay (AdamW's decoupled one; Adafactor's, scaled by its step)",
                                 minimum=0)
    grad_clip: float | None = option(1.0, "clip the gradient norm to this", minimum=0, exclusive_minimum=True,
                                     none="no clipping")
    w_task: float | None = option(None, "weight of the denoising loss", minimum=0, none="1 with data, else 0")
    w_out: float = option(1.0, "weight of the output distillation loss", minimum=0)
    w_feat: float = option(1.0, "weight of the per-block feature distillation loss", minimum=0)
    feature_loss: str = option("normalized", "per-block feature loss: each block's error relative to the teacher "
                               "feature's mean square, or BK-SDM's plain sum", choices=FEATURE_LOSSES)
    ema_decay: float | None = option(None, "keep an EMA of the weights with this decay", minimum=0, maximum=1,
                                     exclusive_minimum=True, exclusive_maximum=True, none="off")
    precision: str = option("fp32", "training precision", choices=PRECISIONS)
    checkpoint_every: int = option(50, "write a checkpoint every K steps", minimum=1)
    keep_checkpoints: int = option(2, "checkpoints kept (the newest)", minimum=1)
    seed: int = option(0, "seed of trajectories and batches", minimum=0)
    trajectories: int = option(32, "data-free: teacher sampling trajectories", minimum=1)
    trajectory_steps: int = option(25, "data-free: scheduler steps per trajectory", minimum=1)
    guidance_scale: float = option(7.5, "data-free: guidance of the teacher's trajectories", minimum=0)
    renoise: float = option(0.5, "data-free: share of each batch re-noised from the teacher's final latents",
                            minimum=0, maximum=1)
    gradient_accumulation: int = option(1, "micro-batches per optimizer step: the batch (per process) is split into "
                                        "this many, their gradients summed, so memory holds one micro-batch",
                                        minimum=1)
    gradient_checkpointing: bool = option(False, "recompute each operator's activations in the backward pass "
                                          "instead of keeping them (less memory, about a third more compute)")
    teacher_dtype: str | None = option(None, "dtype the frozen teacher runs in (its cast copy; a build, which "
                                       "needs the dense model no more, casts it in place): bfloat16 halves its "
                                       "memory", choices=DTYPES, none="the loaded weights' dtype")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is None:  # recorded resolved, so a checkpoint or report names the rate that was used
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])

    def problems(self) -> Iterable[str]:
        if self.w_out == 0 and self.w_feat == 0 and not self.w_task:
            yield "every loss weight is 0 (w_out, w_feat, w_task): nothing would be learned"


@dataclasses.dataclass(frozen=True)
class Tolerance(Config):
    """``max_abs_diff <= atol + rtol * max_abs_ref``."""

    atol: float = option(help="absolute tolerance", minimum=0)
    rtol: float = option(help="tolerance relative to the reference's largest magnitude", minimum=0)

    def bound(self, max_abs_ref: float) -> float:
        return self.atol + self.rtol * max_abs_ref

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}

    @classmethod
    def of(cls, value: Any) -> Tolerance:
        """A Tolerance from itself, ``{"atol": .., "rtol": ..}`` or ``(atol, rtol)``."""
        if isinstance(value, Tolerance):
            return value
        if isinstance(value, Mapping) and set(value) == {"atol", "rtol"}:
            return cls(atol=value["atol"], rtol=value["rtol"])
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(atol=value[0], rtol=value[1])
        raise ConfigError(f"expected Tolerance, {{'atol': .., 'rtol': ..}} or (atol, rtol), got {value!r}")


# fp32: ORT and torch run the same kernels up to summation order; measured ~1e-6 on tiny and 142M-param
# UNets, so 1e-4 leaves room for deep models without hiding a wrong weight. fp16/bf16: half-precision rounding.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
}

def _tolerance_problems(tolerances: Any) -> Iterable[str]:
    if not isinstance(tolerances, Mapping):
        yield f"tolerances must map a dtype name to (atol, rtol), got {tolerances!r}"
        return
    for dtype, tol in tolerances.items():
        if dtype not in DEFAULT_TOLERANCES:
            yield f"tolerances has unknown dtype {dtype!r}; known: {list(DEFAULT_TOLERANCES)}"
            continue
        try:
            Tolerance.of(tol)
        except ConfigError as exc:
            yield f"tolerances[{dtype!r}]: {exc}"


EXPORTERS = ("legacy", "dynamo")
# Opsets each exporter writes natively (torch 2.13): TorchScript exporter up to 20, dynamo/onnxscript 18..23.
OPSET_RANGE = {"legacy": (14, 20), "dynamo": (18, 23)}
DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
PROTOBUF_LIMIT = 2**31  # bytes; a single .onnx protobuf cannot be larger


@dataclasses.dataclass(frozen=True)
class ExportConfig(Config):
    """How to export and how to validate.

    exporter: "legacy" (TorchScript-based ``torch.onnx.export(dynamo=False)``) is the default: on 2 CPU cores it
        exported a 142M-parameter SD-shaped UNet in 15 s against 39 s for "dynamo", and onnxruntime's
        transformer optimizer fuses attention only in legacy exports. "dynamo" is the supported path forward.
    opset: None picks 17 for legacy, 18 for dynamo.
    dynamic_spatial: None makes latent height/width dynamic exactly when the trace is valid for other sizes
        (``TracedUNet.spatial_multiple``); True demands it (error if the trace does not allow it); False fixes them.
    external_data: "auto" stores weights in ``<name>.data`` when they exceed ``external_data_threshold_bytes``;
        "always" / "never" force it ("never" fails for models over the 2 GiB protobuf limit).
    timestep_dtype: dtype of the (batch,) timestep input; float32 keeps fractional timesteps (Karras/Euler
        schedulers) exact and is what the diffusers UNet computes with after its first cast.
    tolerances: per compute dtype of the graph; see ``DEFAULT_TOLERANCES``.
    """

    exporter: str = option("legacy", "torch ONNX exporter: the TorchScript-based one (faster; onnxruntime fuses "
                           "attention only in its exports) or torch.export's", choices=EXPORTERS)
    opset: int | None = option(None, "ONNX opset", none=", ".join(f"{v} with {k}" for k, v in DEFAULT_OPSET.items()))
    dynamic_spatial: bool | None = option(None, "latent height/width as dynamic axes", flag=False,
                                          none="when the trace is valid for other sizes")
    external_data: str = option("auto", "weights in <name>.data", choices=("auto", "always", "never"), flag=False)
    external_data_threshold_bytes: int = option(1_800_000_000, "external data from this weight size on (auto)",
                                                minimum=1, maximum=PROTOBUF_LIMIT - 1, flag=False)
    timestep_dtype: str = option("float32", "dtype of the (batch,) timestep input", choices=("float32", "int64"),
                                 flag=False)
    output_name: str = option("out_sample", "name of the output", flag=False, nonempty=True)
    validate: bool = option(True, "compare onnxruntime with torch after the export", flag=False)
    validation_batch_sizes: tuple[int, ...] = option((1, 2), "batch sizes of the validation", minimum=1,
                                                     nonempty=True, flag=False)
    validation_spatial_size: tuple[int, ...] | None = option(None, "(height, width) of the second validation size",
                                                             minimum=1, flag=False,
                                                             none="(m, 2m) when the latent size is dynamic")
    validation_text_length: int | None = option(None, "tokens of encoder_hidden_states in the validation's check "
                                                "of the free text-length axis", minimum=1, flag=False,
                                                none="77 (CLIP's) when the trace has another length, else half of it")
    validation_seed: int = option(0, "seed of the validation inputs", flag=False)
    validation_providers: tuple[str, ...] = option(("CPUExecutionProvider",), "onnxruntime providers of the "
                                                   "validation", nonempty=True, flag=False)
    tolerances: Mapping[str, Tolerance] = option(default_factory=lambda: dict(DEFAULT_TOLERANCES),
                                                 help="validation tolerance per compute dtype", flag=False,
                                                 check=lambda value: list(_tolerance_problems(value)))

    def problems(self) -> Iterable[str]:
        if self.opset is not None:
            low, high = OPSET_RANGE[self.exporter]
            if not low <= self.opset <= high:
                yield (f"opset {self.opset} is outside what the {self.exporter} exporter writes ({low}..{high}); "
                       "use opset=None for its default")
        if self.validation_spatial_size is not None and len(self.validation_spatial_size) != 2:
            yield f"validation_spatial_size must be None or (height, width), got {self.validation_spatial_size!r}"

    def __post_init__(self) -> None:
        super().__post_init__()
        given = {dtype: Tolerance.of(tol) for dtype, tol in self.tolerances.items()}
        object.__setattr__(self, "tolerances", types.MappingProxyType({**DEFAULT_TOLERANCES, **given}))

    @property
    def resolved_opset(self) -> int:
        return self.opset if self.opset is not None else DEFAULT_OPSET[self.exporter]


@dataclasses.dataclass(frozen=True)
class OptimizeConfig(Config):
    """The export stage's onnxruntime variants: the graph-optimized model, and its fp16 conversion."""

    optimize: bool = option(False, "also write onnxruntime-optimized variants (unet.opt.onnx)")
    fp16: bool = option(False, "also write an fp16 variant of the optimized model (unet.fp16.onnx; needs optimize)")

    def problems(self) -> Iterable[str]:
        if self.fp16 and not self.optimize:
            yield "fp16=True needs optimize=True: the fp16 variant is made from the optimized model"
