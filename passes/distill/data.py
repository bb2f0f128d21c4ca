"""What the distillation trains on: UNet inputs (x_t, t, conditioning), with or without the true noise.

- :class:`TeacherTrajectories` (data-free, the default): the inputs the dense teacher itself sees while it samples
  from seeded noise (and the prompt set, with classifier-free guidance when the model has one), recorded call by
  call; plus, for a ``renoise`` share of each batch, the teacher's final latents noised again at a uniformly drawn
  training timestep, so every timestep is covered and not only the sampler's few.
- :class:`LatentData`: real latents (a dataset encoded through the model's VAE) noised at random timesteps; the
  noise is known, so the task (denoising) loss can be used beside the distillation terms.

Every batch is drawn from a ``torch.Generator`` the caller seeds per step and per rank: a batch is a function of
(seed, step, rank) alone, which is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ldpruner.base.errors import ConfigError
from ldpruner.runtime.graph_unet import GraphUNet
from ldpruner.runtime.sampling import sample_latents

from ..conditioning import Conditioning, uses_guidance

__all__ = ["DistillBatch", "DistillData", "LatentData", "TeacherTrajectories", "noising_scheduler"]

NEGATIVE = -1  # cond id of the unconditional (negative) embedding of row 0; row i's is negative(i) = -(i + 1)


def negative(ids: torch.Tensor) -> torch.Tensor:
    """The cond ids of the unconditional half for rows ``ids``: the guided inputs (text, image embeddings) become
    their negatives, the others (class labels, hints, extra channels) stay the row's own."""
    return -(ids + 1)


@dataclasses.dataclass
class DistillBatch:
    inputs: dict[str, torch.Tensor]  # the UNet's flat inputs by name
    target: torch.Tensor | None = None  # the true ε (or v / x0) when the noise is known: the task loss's target


class DistillData(Protocol):
    def batch(self, generator: torch.Generator, size: int) -> DistillBatch: ...

    def describe(self) -> dict[str, Any]: ...


def noising_scheduler(scheduler: Any) -> Any:
    """A DDPMScheduler with ``scheduler``'s training schedule: ``add_noise`` then gives the x_t the UNet was
    trained on (variance preserving), whatever sampler the pipeline uses."""
    from diffusers import DDPMScheduler

    config = dict(getattr(scheduler, "config", {}) or {})
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "timestep_spacing", "rescale_betas_zero_snr")
    return DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})


def _target(noiser: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = noiser.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noiser.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ConfigError(f"unsupported prediction_type {kind!r} for the task loss")


def _conditioning_inputs(conditioning: Conditioning | None, ids: torch.Tensor, input_names: Sequence[str],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """UNet conditioning inputs for cond ids: row i of every conditioning tensor (i modulo its rows), with the guided
    inputs replaced by their negatives for ids ``negative(i)``."""
    if conditioning is None:
        return {}
    unconditional = ids < 0
    rows = conditioning.rows(torch.where(unconditional, -ids - 1, ids), torch.device("cpu"), dtype)
    n = ids.shape[0]
    out: dict[str, torch.Tensor] = {}
    for name in input_names:
        if name in ("sample", "timestep") or name not in rows:
            continue
        value = rows[name].expand(n, *rows[name].shape[1:]).clone()
        neg = rows.get(f"negative_{name}")
        if neg is not None and bool(unconditional.any()):
            value[unconditional] = neg.expand(int(unconditional.sum()), *neg.shape[1:]).to(value.dtype)
        out[name] = value
    return out


class TeacherTrajectories:
    """UNet inputs recorded along the teacher's own sampling trajectories (data-free distillation).

    ``trajectories`` seeded noises (trajectory i uses row ``i`` of each conditioning tensor, modulo its rows, and
    seed ``seed·1_000_003 + i``) are sampled with ``steps`` scheduler steps; every UNet call's (x_t, t, cond id)
    rows are kept, the negative half of a guided batch included. Under torch.distributed, rank r records
    trajectories ``r::world`` only: each rank trains on its own shard."""

    def __init__(self, teacher: Any, input_names: Sequence[str], scheduler: Any, *, conditioning: Conditioning | None,
                 latent_shape: tuple[int, int, int], trajectories: int, steps: int, guidance_scale: float,
                 seed: int, renoise: float, rank: int = 0, world: int = 1, batch_size: int = 16,
                 progress: bool = False):
        if not 0.0 <= renoise <= 1.0:
            raise ConfigError(f"renoise must be within [0, 1]; got {renoise!r}")
        if trajectories < world:
            raise ConfigError(f"trajectories={trajectories} gives some of the {world} ranks no trajectory; "
                              f"use at least {world}")
        self.input_names = tuple(input_names)
        self.conditioning = conditioning
        # a score-SDE UNet takes noise levels (sigmas), not the training timesteps a re-noised row would carry
        self.renoise = 0.0 if hasattr(scheduler, "step_pred") else renoise
        self.noiser = noising_scheduler(scheduler)
        param = next(teacher.parameters())
        teacher_dtype = param.dtype
        self.dtype = torch.float32  # what the batches hold: each model gets them in its own dtype from the trainer
        use_cfg = conditioning is not None and conditioning.has_negative and uses_guidance(input_names, guidance_scale)
        self.guidance_scale = guidance_scale if use_cfg else 1.0
        mine = list(range(rank, trajectories, world))
        samples: list[torch.Tensor] = []
        timesteps: list[torch.Tensor] = []
        cond_ids: list[torch.Tensor] = []
        finals: list[torch.Tensor] = []
        final_ids: list[torch.Tensor] = []

        graph = GraphUNet(teacher, self.input_names)

        def unet_fn(**inputs: torch.Tensor) -> torch.Tensor:
            samples.append(inputs["sample"].detach().float().cpu())
            timesteps.append(inputs["timestep"].detach().cpu().reshape(-1).expand(inputs["sample"].shape[0]))
            cond_ids.append(torch.cat([negative(chunk_ids), chunk_ids]) if use_cfg else chunk_ids)
            return graph.flat(**inputs)

        from tqdm.auto import tqdm

        chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        with torch.no_grad():
            for chunk in tqdm(chunks, desc="teacher trajectories", disable=not progress, leave=False):
                index = torch.tensor(chunk)
                # the trajectory's own index: every conditioning tensor is indexed by it modulo its own rows, in the
                # batches as in the sampling (tensors may have different row counts)
                chunk_ids = index
                noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(
                    seed * 1_000_003 + i)) for i in chunk]).to(param.device, teacher_dtype)
                cond = conditioning.rows(index, param.device, teacher_dtype) if conditioning is not None else {}
                cond = {k: v for k, v in cond.items()
                        if k in self.input_names or k.startswith("negative_") or k == "extra_channels"}
                generators = [torch.Generator().manual_seed(seed * 1_000_003 + i + 7919) for i in chunk]
                final = sample_latents(unet_fn, scheduler, noise=noise, steps=steps, guidance_scale=self.guidance_scale,
                                       generator=generators, **cond)
                finals.append(final.detach().float().cpu())
                final_ids.append(chunk_ids)
        self.sample = torch.cat(samples)
        self.timestep = torch.cat(timesteps)
        self.cond_ids = torch.cat(cond_ids)
        self.final = torch.cat(finals)
        self.final_ids = torch.cat(final_ids)
        self.trajectories, self.steps, self.world = len(mine), steps, world
        self.unet_calls = len(samples)

    def batch(self, generator: torch.Generator, size: int) -> DistillBatch:
        renoised = int(round(size * self.renoise))
        recorded = size - renoised
        idx = torch.randint(0, self.sample.shape[0], (recorded,), generator=generator)
        x = [self.sample[idx]]
        t = [self.timestep[idx]]
        ids = [self.cond_ids[idx]]
        if renoised:
            j = torch.randint(0, self.final.shape[0], (renoised,), generator=generator)
            steps = torch.randint(0, self.noiser.config.num_train_timesteps, (renoised,), generator=generator)
            noise = torch.randn(self.final[j].shape, generator=generator)
            noised = self.noiser.add_noise(self.final[j].float(), noise, steps)
            if self.conditioning is not None and self.conditioning.extra_channels is not None:
                # the recorded inputs carry the pipeline's extra channels; a renoised final latent gets its own
                extra = self.conditioning.extra_channels
                noised = torch.cat([noised, extra[self.final_ids[j] % extra.shape[0]].float()], dim=1)
            x.append(noised.to(self.sample.dtype))
            t.append(steps.to(self.timestep.dtype))
            drop = torch.rand(renoised, generator=generator) < 0.5 if self.guidance_scale > 1 else None
            fid = self.final_ids[j].clone()
            if drop is not None:
                fid[drop] = negative(fid[drop])
            ids.append(fid)
        cond_ids = torch.cat(ids)
        inputs = {"sample": torch.cat(x), "timestep": torch.cat(t)}
        inputs.update(_conditioning_inputs(self.conditioning, cond_ids, self.input_names, self.dtype))
        return DistillBatch(inputs={n: inputs[n] for n in self.input_names})

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "teacher-trajectories",
            "trajectories_on_this_rank": self.trajectories,
            "sampling_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "recorded_rows": int(self.sample.shape[0]),
            "renoise_fraction": self.renoise,
            "conditioning": None if self.conditioning is None else self.conditioning.source,
            "teacher_unet_calls": self.unet_calls,
        }


class LatentData:
    """Real latents ``x0`` (N, C, H, W), already scaled by the VAE's scaling factor, with one cond id per row
    (NEGATIVE or None for unconditional models). A batch noises rows at uniform training timesteps; with
    ``cfg_dropout`` a share of the conditions is replaced by the empty prompt, as in training with guidance."""

    def __init__(self, latents: torch.Tensor, scheduler: Any, input_names: Sequence[str], *,
                 conditioning: Conditioning | None = None, cond_ids: torch.Tensor | None = None,
                 cfg_dropout: float = 0.1, source: str = "latents", rank: int = 0, world: int = 1):
        if latents.ndim != 4 or latents.shape[0] == 0:
            raise ConfigError(f"latents must be a non-empty (N, C, H, W) tensor; got shape {tuple(latents.shape)}")
        if conditioning is not None and (cond_ids is None or cond_ids.shape[0] != latents.shape[0]):
            raise ConfigError("conditioned latents need one cond id per latent")
        if not 0.0 <= cfg_dropout < 1.0:
            raise ConfigError(f"cfg_dropout must be within [0, 1); got {cfg_dropout!r}")
        if latents.shape[0] < world:
            raise ConfigError(f"{latents.shape[0]} latents cannot be shared by {world} ranks")
        self.latents = latents[rank::world].float()
        self.cond_ids = None if cond_ids is None else cond_ids[rank::world]
        self.conditioning = conditioning
        self.noiser = noising_scheduler(scheduler)
        self.input_names = tuple(input_names)
        self.cfg_dropout = cfg_dropout if conditioning is not None and conditioning.has_negative else 0.0
        self.source = source

    def batch(self, generator: torch.Generator, size: int) -> DistillBatch:
        idx = torch.randint(0, self.latents.shape[0], (size,), generator=generator)
        x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, self.noiser.config.num_train_timesteps, (size,), generator=generator)
        inputs = {"sample": self.noiser.add_noise(x0, noise, t), "timestep": t}
        if self.cond_ids is not None:
            ids = self.cond_ids[idx].clone()
            if self.cfg_dropout:
                drop = torch.rand(size, generator=generator) < self.cfg_dropout
                ids[drop] = negative(ids[drop])
            inputs.update(_conditioning_inputs(self.conditioning, ids, self.input_names, torch.float32))
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ConfigError(f"the data gives no {missing} for this UNet (a conditional model needs captions)")
        return DistillBatch(inputs={n: inputs[n] for n in self.input_names}, target=_target(self.noiser, x0, noise, t))

    def describe(self) -> dict[str, Any]:
        return {"kind": "latents", "source": self.source, "rows_on_this_rank": int(self.latents.shape[0]),
                "cfg_dropout": self.cfg_dropout, "prediction_type": self.noiser.config.prediction_type,
                "conditioning": None if self.conditioning is None else self.conditioning.source}
