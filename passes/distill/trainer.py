"""Distillation fine-tuning: the pruned UNet (student) learns to match the dense UNet (teacher, frozen).

    L = w_task · ‖ε_s − ε‖²  +  w_out · ‖ε_s − ε_t‖²  +  w_feat · F,
        F = Σ_g ‖f_s^g − f_t^g‖²  ("mse")
     or F = (1/G) Σ_g ‖f_s^g − f_t^g‖² / ‖f_t^g‖²  ("normalized")

ε_s, ε_t: student and teacher predictions on the same inputs; ε: the true noise (task term, real data only);
f^g: the output of operator group g (``down_blocks.i``, ``mid_block``, ``up_blocks.i``), tapped through the fx
graphs (:mod:`ldpruner.compiler.taps`, no hooks). Squared norms are means over elements. ``normalized`` (the
default) divides each group's error by the teacher feature's mean square and averages over groups, so neither a
high-magnitude block nor the number of blocks decides the loss (BK-SDM's plain sum is dominated by its largest
features).

Training: AdamW (or Adafactor), linear warm-up then cosine (or linear / constant) decay, gradient-norm clipping,
optional EMA of the student's weights, fp32 or bf16 autocast; the teacher may run in a lower precision.
Checkpoints (:mod:`~ldpruner.passes.distill.checkpoint`: weights, EMA, optimizer, LR schedule, RNG, loss log) are
written atomically every ``checkpoint_every`` steps; a resumed run continues bit-identically, because every batch is
drawn from a generator seeded by (seed, step, rank). Under torchrun the student is wrapped in DDP (gloo on CPU, NCCL
on GPU), each rank trains on its own shard of the data, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldpruner.base import devices, distributed
from ldpruner.base.errors import ConfigError, DistillError
from ldpruner.base.io import atomic_path, write_text_atomic
from ldpruner.compiler.taps import FeatureTaps, match_taps, tapped
from ldpruner.compiler.tracer import TracedUNet

from ..config import DistillConfig
from ..remove import PrunedUNet
from ..student import save_student
from .checkpoint import CHECKPOINTS, checkpoint_to_resume, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import DistillData
from .summary import SUMMARY

__all__ = ["DistillConfig", "DistillResult", "distill", "feature_loss", "lr_factor", "plot_loss"]

LOG_FIELDS = ("step", "lr", "loss", "task", "out", "feat", "grad_norm", "time_s")


@dataclasses.dataclass
class DistillResult:
    """The distilled student (EMA weights when EMA is on) and what the run did."""

    student: PrunedUNet
    log: list[dict[str, float]]
    summary: dict[str, Any]


# --- learning-rate schedule -----------------------------------------------------------------------------------------

def lr_factor(step: int, config: DistillConfig) -> float:
    """The LR multiplier after ``step`` optimizer steps: linear warm-up, then the chosen decay to min_lr_ratio."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay


# --- the loss --------------------------------------------------------------------------------------------------------

def feature_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], kind: str) -> torch.Tensor:
    """F of the module docstring: the sum of per-group MSEs, or the mean of per-group relative MSEs."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        mse = F.mse_loss(s.float(), t.float())
        terms.append(mse / t.float().pow(2).mean().clamp_min(1e-8) if kind == "normalized" else mse)
    if not terms:
        return torch.zeros(())
    stacked = torch.stack(terms)
    return stacked.mean() if kind == "normalized" else stacked.sum()


def _cast(inputs: list[torch.Tensor], names: Sequence[str], dtype: torch.dtype) -> list[torch.Tensor]:
    """The inputs in a model's dtype, but the timestep as it is: a float timestep (Euler, DPM schedulers) rounded to
    bfloat16 would be another timestep (958 → 960), and the UNet embeds it in float32 itself."""
    return [x.to(dtype) if x.is_floating_point() and name != "timestep" else x
            for x, name in zip(inputs, names, strict=True)]


def _step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch: a function of (seed, step, rank, micro-batch) alone, so a resumed run
    draws the same batches (the first micro-batch's is the one runs without accumulation have always drawn)."""
    key = f"{seed}:{step}:{rank}" + (f":{micro}" if micro else "")
    mixed = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(mixed[:8], "little") & ((1 << 63) - 1))


def _checkpointed(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run ``module`` keeping only its inputs for the backward pass, which recomputes its activations."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module, *args, use_reentrant=False, **kwargs)


def checkpoint_operators(gm: torch.fx.GraphModule, granularity: Any) -> int:
    """Rewrite ``gm`` (in place) so that every operator call (ResNet, transformer, attention blocks: the units the
    analysis scores) runs under activation checkpointing; returns how many calls were wrapped. The modules and
    their parameters are untouched, only the graph's calls change."""
    from ldpruner.compiler.operators import is_operator

    wrapped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_operator(gm.get_submodule(node.target), granularity):
            continue
        with gm.graph.inserting_before(node):
            module = gm.graph.get_attr(node.target)
            call = gm.graph.call_function(_checkpointed, (module, *node.args), dict(node.kwargs))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        wrapped += 1
    gm.graph.lint()
    gm.recompile()
    return wrapped


class _Trainer:
    def __init__(self, student: PrunedUNet, teacher: TracedUNet, data: DistillData, config: DistillConfig,
                 taps: FeatureTaps, rank: int, world: int, device: torch.device):
        self.student, self.config, self.data, self.taps = student, config, data, taps
        self.rank, self.world, self.device = rank, world, device
        self.names = teacher.input_names
        self.teacher = tapped(teacher.gm, taps.groups).to(device).eval()
        self.teacher.requires_grad_(False)
        student.gm.to(device).train().requires_grad_(True)  # every weight of the student learns
        self.model: torch.nn.Module = tapped(student.gm, taps.groups)  # a new graph over the student's modules
        self.checkpointed = (checkpoint_operators(self.model, student.traced.granularity)
                             if config.gradient_checkpointing else 0)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model,
                                                 device_ids=[device.index] if device.type == "cuda" else None)
        self.params = dict(student.gm.named_parameters())
        weights = list(self.params.values())
        self.optimizer = (torch.optim.Adafactor(weights, lr=config.lr, weight_decay=config.weight_decay)
                          if config.optimizer == "adafactor" else
                          torch.optim.AdamW(weights, lr=config.lr, weight_decay=config.weight_decay))
        # each model gets its inputs in its own dtype (a teacher cast to bfloat16 reads bfloat16)
        self.teacher_dtype = next(self.teacher.parameters()).dtype
        self.student_dtype = next(student.gm.parameters()).dtype
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.ema = ({k: p.detach().clone().float() for k, p in self.params.items()}
                    if config.ema_decay is not None else None)
        self.step = 0
        self.log: list[dict[str, float]] = []
        self.w_task = config.w_task
        self.teacher_weights: str | None = None  # the teacher's identity (ldpruner.sources.weights_id), if known
        self.allow_other_weights = False
        # every resume against another teacher than the checkpoint's, kept in the checkpoints so none is forgotten
        self.resumed_with_other_teachers: list[dict[str, Any]] = []
        self._checked_at = 0  # the first step of this run checks that every tap compares like with like

    # --- one step ------------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation`` micro-batches (their gradients summed, each loss
        divided by their number, so the step sees the mean over the whole effective batch)."""
        config = self.config
        started = time.perf_counter()
        micro_batches = config.gradient_accumulation
        size = config.batch_size // (self.world * micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64)
        for micro in range(micro_batches):
            batch = self.data.batch(_step_generator(config.seed, self.step, self.rank, micro), size)
            # under DDP the gradients are averaged over ranks once, on the last micro-batch
            last = micro == micro_batches - 1
            sync = self.model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with sync:
                sums += self._micro_step(batch, micro == 0, scale=1.0 / micro_batches).double()
        terms = (sums / micro_batches).float()
        if config.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params.values()
                                                              if p.grad is not None]))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            decay = min(config.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for k, p in self.params.items():
                    self.ema[k].lerp_(p.detach().float(), 1 - decay)
        if self.world > 1:
            import torch.distributed as dist

            terms = terms.to(self.device)  # NCCL reduces device tensors, gloo host ones
            dist.all_reduce(terms)
            terms = terms.cpu() / self.world
        row = {"step": self.step, "lr": lr, "loss": float(terms[0]), "task": float(terms[1]),
               "out": float(terms[2]), "feat": float(terms[3]), "grad_norm": float(grad_norm),
               "time_s": time.perf_counter() - started}
        self.log.append(row)
        return row

    def _micro_step(self, batch: Any, first: bool, *, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch (its loss scaled by ``scale``); returns its loss terms
        (loss, task, out, feat)."""
        config = self.config
        inputs = [batch.inputs[n].to(self.device) for n in self.names]
        w_task = self.w_task if self.w_task is not None else (1.0 if batch.target is not None else 0.0)
        if w_task and batch.target is None:
            raise DistillError(f"w_task={w_task} needs data with known noise (a dataset); teacher trajectories "
                               "have none: set w_task to 0 or pass data")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
        with torch.no_grad(), autocast:
            t_out, t_feats = self.teacher(*_cast(inputs, self.names, self.teacher_dtype))
        with autocast:
            s_out, s_feats = self.model(*_cast(inputs, self.names, self.student_dtype))
        if first and self.step == self._checked_at:
            self._check_taps(s_out, t_out, s_feats, t_feats)
        s_out, t_out = s_out.float(), t_out.float()
        out_term = F.mse_loss(s_out, t_out)
        feat_term = feature_loss(s_feats, t_feats, config.feature_loss).to(s_out.device)
        task_term = (F.mse_loss(s_out, batch.target.to(s_out)) if batch.target is not None
                     else torch.zeros((), device=s_out.device))
        loss = config.w_out * out_term + config.w_feat * feat_term + w_task * task_term
        if not torch.isfinite(loss):
            raise DistillError(f"the loss is {float(loss)} at step {self.step + 1} (out {float(out_term):.4g}, feat "
                               f"{float(feat_term):.4g}, task {float(task_term):.4g}); "
                               "lower lr or use precision='fp32'")
        (loss * scale if scale != 1.0 else loss).backward()
        return torch.stack([loss.detach(), task_term.detach(), out_term.detach(), feat_term.detach()]).float().cpu()

    def _check_taps(self, s_out: Any, t_out: Any, s_feats: Any, t_feats: Any) -> None:
        pairs = [("the output", s_out, t_out)] + list(zip(self.taps.groups, s_feats, t_feats))
        bad = [f"{name}: student {_shape(s)}, teacher {_shape(t)}" for name, s, t in pairs
               if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.shape == t.shape)]
        if bad:
            raise DistillError("student and teacher values do not match in shape, so they cannot be compared: "
                               + "; ".join(bad))

def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# --- outputs ---------------------------------------------------------------------------------------------------------

def _write_log(out: Path, log: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(log)
    write_text_atomic(out / "loss.csv", buffer.getvalue())
    write_text_atomic(out / "loss.json", json.dumps(log, indent=1) + "\n")


def plot_loss(log: list[dict[str, float]], path: Path, title: str = "distillation loss") -> Path | None:
    """loss.png: every loss term against the step (log scale). None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in ("loss", "out", "feat", "task"):
        values = [r[key] for r in log]
        if any(v > 0 for v in values):
            ax.plot(steps, values, label=key, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def distill(
    student: PrunedUNet,
    teacher: TracedUNet,
    data: DistillData,
    *,
    config: DistillConfig | None = None,
    out: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
    teacher_weights: str | None = None,
    allow_other_weights: bool = False,
    world: distributed.World | None = None,
) -> DistillResult:
    """Fine-tune ``student`` (in place) against ``teacher`` on ``data``; write ``out/student/``, ``loss.csv``,
    ``loss.json``, ``loss.png``, ``distill.json`` and ``out/checkpoints/``.

    ``teacher`` is the dense model traced at the student's granularity (it is frozen, never changed).
    ``resume`` continues from the newest checkpoint in ``out`` (or starts fresh when there is none). ``callback``
    gets each step's log row (an exception it raises stops the run, as a kill would). Under torchrun every rank
    calls this; rank 0 alone writes. ``teacher_weights``: the teacher's identity (:func:`ldpruner.sources.weights_id`),
    recorded in checkpoints and distill.json; resuming a checkpoint trained against another teacher is refused
    unless ``allow_other_weights``. ``device``: where the student trains (None: where its weights are); ``world``:
    this process's place among the torchrun processes, as the command's placement joined it (None: the process group
    already initialised, else one process)."""
    config = config if config is not None else DistillConfig()
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"config must be a DistillConfig, got {type(config).__name__}")
    if config.steps == 0:
        raise ConfigError("steps=0 must be >= 1: distillation trains at least one step")
    if teacher.input_names != student.traced.input_names:
        raise DistillError(f"teacher inputs {teacher.input_names} differ from the student's "
                           f"{student.traced.input_names}: trace both from the same model class")
    if teacher.granularity != student.traced.granularity:
        raise DistillError(f"teacher traced at {teacher.granularity.value} granularity, student at "
                           f"{student.traced.granularity.value}")
    home = next(student.gm.parameters()).device
    device = torch.device(device) if device is not None else home
    joined = world if world is not None else distributed.current()
    rank, world = joined.rank, joined.size
    out = Path(out)
    if config.batch_size % (world * config.gradient_accumulation):
        raise ConfigError(f"batch_size={config.batch_size} must split evenly over {world} process(es) x "
                          f"gradient_accumulation={config.gradient_accumulation} micro-batches")
    checkpoint = checkpoint_to_resume(out, resume=resume, overwrite=overwrite) if rank == 0 else (
        latest_checkpoint(out) if resume else None)
    taps = match_taps(teacher.gm, student.gm)
    trainer = _Trainer(student, teacher, data, config, taps, rank, world, device)
    trainer.teacher_weights, trainer.allow_other_weights = teacher_weights, allow_other_weights
    resumed_from = None
    if checkpoint is not None:
        load_checkpoint(trainer, checkpoint)
        resumed_from = trainer._checked_at = trainer.step
    started = time.perf_counter()
    devices.reset_peak_memory(device)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=trainer.step, desc="distill", unit="step",
               disable=not progress or rank != 0)
    while trainer.step < config.steps:
        row = trainer.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4g}")
        if rank == 0 and (trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps):
            save_checkpoint(trainer, out)
        if callback is not None:
            callback(row)
    bar.close()
    elapsed = time.perf_counter() - started
    if trainer.resumed_with_other_teachers:  # the distilled student's plan records them
        student = trainer.student = dataclasses.replace(student, plan=dataclasses.replace(
            student.plan, other_weights=(*student.plan.other_weights, *trainer.resumed_with_other_teachers)))
    student.gm.eval()
    student.gm.to(home)  # back where it came from: beside its example inputs, ready to export or sample
    if trainer.ema is not None:
        with torch.no_grad():
            for k, p in trainer.params.items():
                p.copy_(trainer.ema[k].to(p.dtype))
    summary = _summary(trainer, data, resumed_from, elapsed, device, world)
    if rank == 0:
        save_student(student, out / "student", overwrite=True)
        _write_log(out, trainer.log)
        plotted = plot_loss(trainer.log, out / "loss.png")
        summary["artifacts"]["loss.png"] = str(plotted) if plotted else "not written: matplotlib is not installed"
        SUMMARY.write(out / SUMMARY.name, summary)
    return DistillResult(student=student, log=trainer.log, summary=summary)


def _summary(trainer: _Trainer, data: DistillData, resumed_from: int | None, elapsed: float,
             device: torch.device, world: int) -> dict[str, Any]:
    log = trainer.log
    tail = log[-max(1, len(log) // 10):]
    first = log[:max(1, len(log) // 10)]

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "format": SUMMARY.format,
        "config": trainer.config.to_dict(),
        "steps": trainer.step,
        "resumed_from_step": resumed_from,
        "wall_time_s_this_run": round(elapsed, 3),
        "device": str(device),
        "accelerator": devices.accelerator_name(device),
        "threads": torch.get_num_threads(),  # torch's intra-op threads as the steps ran (per process)
        "world_size": world,
        "micro_batch_per_process": trainer.config.batch_size // (world * trainer.config.gradient_accumulation),
        "gradient_checkpointing": {"on": trainer.config.gradient_checkpointing,
                                   "operators_wrapped": trainer.checkpointed},
        # the peak of the training steps of this run (the host's is the process's high-water mark so far)
        "peak_memory": devices.peak_memory(device),
        "data": data.describe(),
        "feature_taps": trainer.taps.to_dict(),
        "teacher_weights": trainer.teacher_weights,
        "other_weights": list(trainer.student.plan.other_weights),
        "student_params": sum(p.numel() for p in trainer.params.values()),
        "teacher_params": sum(p.numel() for p in trainer.teacher.parameters()),
        "ema": trainer.ema is not None,
        "loss_first_10pct": {k: mean(first, k) for k in ("loss", "task", "out", "feat")},
        "loss_last_10pct": {k: mean(tail, k) for k in ("loss", "task", "out", "feat")},
        "artifacts": {name: str(Path(name)) for name in ("student", "loss.csv", "loss.json", CHECKPOINTS)},
    }
