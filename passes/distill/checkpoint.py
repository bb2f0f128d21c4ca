"""The distillation's checkpoints: ``out/checkpoints/step-NNNNNNNN/``, each written atomically, the newest
``keep_checkpoints`` kept, the newest complete one resumed from.

A checkpoint holds ``state.json`` (format ``ldpruner.distill-checkpoint/1``: step, config, world size, the plan's
fingerprint, the teacher's identity and every resume against another teacher, the feature taps, parameter names,
the optimizer's param groups, the LR schedule and the loss log) and three safetensors files: ``student``, ``ema``
(when EMA is on) and ``optimizer`` (the optimizer state as ``<parameter index>.<name>``, the RNG states as
``rng.torch`` / ``rng.cuda``). A run resumes only from a checkpoint it can continue bit-identically: the same
config but ``steps``, world size, plan and student, and the same teacher unless ``allow_other_weights``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ldpruner.base.errors import ArtifactError, DistillError, WeightsMismatchError
from ldpruner.base.io import atomic_dir, read_json
from ldpruner.compiler.taps import FeatureTaps

from ..config import DistillConfig
from ..plan import is_weights_id, short_id
from ..remove import PrunedUNet
from ..student import read_safetensors, tensors_for_safetensors
from .summary import SUMMARY

__all__ = ["CHECKPOINTS", "CHECKPOINT_FORMAT", "Checkpointed", "checkpoint_state", "checkpoint_to_resume",
           "latest_checkpoint", "load_checkpoint", "plan_fingerprint", "save_checkpoint"]

CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "ldpruner.distill-checkpoint/1"


class Checkpointed(Protocol):
    """What a checkpoint saves and restores: the trainer's state."""

    student: PrunedUNet
    config: DistillConfig
    world: int
    device: torch.device
    taps: FeatureTaps
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: dict[str, torch.Tensor] | None
    step: int
    log: list[dict[str, float]]
    teacher_weights: str | None  # the teacher's identity (ldpruner.sources.weights_id), if known
    allow_other_weights: bool
    resumed_with_other_teachers: list[dict[str, Any]]


def _checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints`` (a folder with state.json), or None."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def checkpoint_to_resume(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to mix a new run into an old folder."""
    checkpoint = latest_checkpoint(out) if resume else None
    leftovers = [p for p in (out / CHECKPOINTS, out / "student", out / SUMMARY.name) if p.exists()]
    if resume and checkpoint is None and not overwrite and any(p.name != CHECKPOINTS for p in leftovers):
        raise ArtifactError(f"resume=True (--resume) found no checkpoint in {str(out / CHECKPOINTS)!r}, but "
                            f"{str(out)!r} holds {[p.name for p in leftovers]} of an earlier distillation, which "
                            "cannot be continued without its checkpoints; pass overwrite=True (--overwrite) to start "
                            "over")
    if resume:
        return checkpoint  # nothing there yet: a fresh start, as torchrun restarts expect
    if leftovers and not overwrite:
        raise ArtifactError(f"{str(out)!r} already holds a distillation ({[p.name for p in leftovers]}); pass "
                            "resume=True (--resume) to continue it or overwrite=True (--overwrite) to start over")
    if leftovers:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return None


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    flat, aliases = tensors_for_safetensors(tensors)
    save_file(flat, str(path), metadata={"format": "pt", "ldpruner.aliases": json.dumps(aliases)})


def plan_fingerprint(student: PrunedUNet) -> str:
    """The removals and totals of the student's plan (the weights it records are checked on their own)."""
    plan = {k: v for k, v in student.plan.to_dict().items() if k not in ("model_weights", "other_weights")}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_state(trainer: Checkpointed) -> dict[str, Any]:
    """The state.json of a checkpoint of ``trainer`` now."""
    opt = trainer.optimizer.state_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "step": trainer.step,
        "config": trainer.config.to_dict(),
        "world_size": trainer.world,
        "plan": plan_fingerprint(trainer.student),
        "teacher_weights": trainer.teacher_weights,
        "resumed_with_other_teachers": trainer.resumed_with_other_teachers,
        "taps": trainer.taps.to_dict(),
        "param_names": list(trainer.params),
        "optimizer_param_groups": opt["param_groups"],
        "lr_scheduler": {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"},
        "log": trainer.log,
    }


def save_checkpoint(trainer: Checkpointed, out: Path) -> Path:
    """Write the checkpoint of ``trainer``'s current step under ``out/checkpoints`` (atomically) and delete all but
    the newest ``keep_checkpoints``; returns its folder."""
    path = _checkpoint_dir(out, trainer.step)
    opt_state = trainer.optimizer.state_dict()["state"]
    optim = {f"{i}.{k}": v for i, s in opt_state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    optim["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and trainer.device.type == "cuda":
        optim["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    with atomic_dir(path) as tmp:
        _save_tensors(tmp / "student.safetensors", {k: v.detach() for k, v in trainer.student.gm.state_dict().items()})
        if trainer.ema is not None:
            _save_tensors(tmp / "ema.safetensors", trainer.ema)
        _save_tensors(tmp / "optimizer.safetensors", optim)
        (tmp / "state.json").write_text(json.dumps(checkpoint_state(trainer), indent=1) + "\n")
    finished = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file())
    for old in finished[:-trainer.config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(trainer: Checkpointed, path: Path) -> None:
    """Restore ``trainer`` from the checkpoint at ``path``, after checking that the run can continue it."""
    state = read_json(path / "state.json", what="checkpoint state", error=DistillError)
    _check_resumable(trainer, path, state)
    weights = read_safetensors(path / "student.safetensors")
    trainer.student.gm.load_state_dict({k: v.to(trainer.device) for k, v in weights.items()}, strict=True)
    if trainer.ema is not None:
        trainer.ema = {k: v.to(trainer.device) for k, v in read_safetensors(path / "ema.safetensors").items()}
    optim = read_safetensors(path / "optimizer.safetensors")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in optim.items():
        if key.startswith("rng."):
            continue
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value.to(trainer.device) if name != "step" else value
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
    sched = trainer.scheduler.state_dict()
    sched.update(state["lr_scheduler"])
    trainer.scheduler.load_state_dict(sched)
    torch.set_rng_state(optim["rng.torch"])
    if "rng.cuda" in optim and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(optim["rng.cuda"], trainer.device)
    trainer.step = int(state["step"])
    trainer.log = list(state["log"])


def _check_resumable(trainer: Checkpointed, path: Path, state: dict[str, Any]) -> None:
    """The format and version checks of ``state`` (a checkpoint's state.json), and the refusal of a checkpoint this
    run cannot continue; records on ``trainer`` a resume against another teacher that ``allow_other_weights``
    allows."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{str(path)!r} is not a distillation checkpoint (format {state.get('format')!r})")
    missing = [k for k in ("step", "config", "world_size", "plan", "param_names", "optimizer_param_groups",
                           "lr_scheduler", "log") if k not in state]
    if missing:
        raise DistillError(f"checkpoint {str(path / 'state.json')!r} lacks {missing}: it is damaged; delete "
                           f"{str(path)!r} to resume from an earlier checkpoint, or start over with --overwrite")
    saved = dict(state["config"])
    now = trainer.config.to_dict()
    # options a checkpoint predates had their defaults then
    differ = sorted(k for k in now if k != "steps" and saved.get(k, DistillConfig.default(k)) != now[k])
    if differ:
        pairs = ", ".join(f"{k}: checkpoint {saved.get(k, DistillConfig.default(k))!r}, now {now[k]!r}"
                          for k in differ)
        raise DistillError(f"cannot resume from {str(path)!r}: the config changed ({pairs}); only steps may "
                           "change on resume, or start over with overwrite")
    if state["world_size"] != trainer.world:
        raise DistillError(f"cannot resume from {str(path)!r}: it ran on {state['world_size']} processes, this "
                           f"run has {trainer.world} (each rank's data shard depends on the world size)")
    if state["plan"] != plan_fingerprint(trainer.student) or state["param_names"] != list(trainer.params):
        raise DistillError(f"cannot resume from {str(path)!r}: it was written for another student (plan differs)")
    before, resumes = state.get("teacher_weights"), state.get("resumed_with_other_teachers") or []
    if not (before is None or is_weights_id(before)) or not (isinstance(resumes, list) and all(
            isinstance(r, dict) and is_weights_id(r.get("used_with")) for r in resumes)):
        raise DistillError(f"checkpoint {str(path / 'state.json')!r} has a damaged teacher record "
                           f"(teacher_weights {before!r}, resumed_with_other_teachers {resumes!r}); delete "
                           f"{str(path)!r} to resume from an earlier checkpoint, or start over with --overwrite")
    trainer.resumed_with_other_teachers = list(resumes)
    if before is not None and trainer.teacher_weights is not None and before != trainer.teacher_weights:
        if not trainer.allow_other_weights:
            raise WeightsMismatchError(
                f"cannot resume from {str(path)!r}: it was trained against the teacher weights "
                f"{short_id(before)}, MODEL has {short_id(trainer.teacher_weights)}; pass the teacher it was "
                "trained against, --allow-other-weights (allow_other_weights=True) to go on with this one "
                "(distill.json records it), or --overwrite to start over")
        trainer.resumed_with_other_teachers.append({"stage": "distill --resume", "made_for": before,
                                                    "used_with": trainer.teacher_weights, "at_step": state["step"]})
    if state["step"] > trainer.config.steps:
        raise DistillError(f"checkpoint {str(path)!r} is at step {state['step']}, past steps={trainer.config.steps}")
