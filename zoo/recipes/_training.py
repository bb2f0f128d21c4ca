"""What the zoo's latent diffusion recipes share: the command line, a KL autoencoder, a UNet with EMA weights, the
saved diffusers folder and its training record.

    VAE:  |decode(z) - x|_1 + kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x)
    UNet: |eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t)|^2,   z0 ~ q(z|x) * scaling_factor,   EMA of theta kept

Every random draw comes from the one ``torch.Generator`` a recipe seeds, in a fixed order (a conditioning hook draws
between the latent and the noise), so each recipe reproduces its committed weights from ``--seed`` with the same
torch version and thread count. The recipes keep what is their own: data, configs, evaluation and the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ConfigError
from ldpruner.base.io import json_safe, read_json, write_json_atomic
from ldpruner.zoo import MissingPackageError

__all__ = [
    "DDIM_EXTRA",
    "add_output_arguments",
    "add_training_arguments",
    "card_command",
    "card_training_metrics",
    "cosine_lr",
    "encode_latents",
    "notes_section",
    "parameter_counts",
    "parse_recipe_args",
    "recipe_parser",
    "reread_training",
    "run_recipe",
    "save_model_folder",
    "scale_latents",
    "train_unet",
    "train_vae",
    "training_record",
    "write_training_and_card",
]

# the DDIM sampler every recipe saves beside its DDPM training schedule
DDIM_EXTRA = {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
# the training flags that must be >= 1 in every recipe
POSITIVE_TRAINING_ARGUMENTS = ("batch_size", "vae_steps", "unet_steps", "threads")


# -- command line ------------------------------------------------------------------------------------------------

def recipe_parser(module: str, doc: str, model: str) -> argparse.ArgumentParser:
    """The parser of ``python -m ldpruner.zoo.recipes.<module>``: --out (default ``zoo/<model>``), --overwrite, --seed
    and --threads; the recipe adds its own flags, then ``add_training_arguments`` and ``add_output_arguments``."""
    p = argparse.ArgumentParser(prog=f"python -m ldpruner.zoo.recipes.{module}", description=doc.split("\n")[0])
    default_out = Path(__file__).resolve().parent.parent / model
    p.add_argument("--out", type=Path, default=default_out, help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; results depend on it, and on a shared 2-core machine 1 is fastest")
    return p


def add_training_arguments(p: argparse.ArgumentParser, *, vae_steps: int, kl_weight: float, unet_steps: int,
                           vae_batch_size: int | None = None) -> None:
    """The flags of ``train_vae`` and ``train_unet`` with this recipe's defaults; ``vae_batch_size`` adds
    --vae-batch-size for a VAE that trains on other batches than the UNet's --batch-size."""
    p.add_argument("--batch-size", type=int, default=64)
    if vae_batch_size is not None:
        p.add_argument("--vae-batch-size", type=int, default=vae_batch_size)
    p.add_argument("--vae-steps", type=int, default=vae_steps)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=kl_weight)
    p.add_argument("--unet-steps", type=int, default=unet_steps)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)


def add_output_arguments(p: argparse.ArgumentParser, *, evaluate_only_rewrites: str) -> None:
    """--dtype of the saved weights and --evaluate-only, which rewrites ``evaluate_only_rewrites`` of --out."""
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the saved weights (diffusers loads them as float32 either way)")
    p.add_argument("--evaluate-only", action="store_true",
                   help=f"train nothing: evaluate the model already in --out and rewrite {evaluate_only_rewrites}")


def parse_recipe_args(p: argparse.ArgumentParser, argv: list[str] | None, *,
                      positive: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse ``argv``; the training flags and the recipe's ``positive`` ones must be >= 1."""
    args = p.parse_args(argv)
    for name in POSITIVE_TRAINING_ARGUMENTS + positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    return args


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_recipe(args: argparse.Namespace, *, train: Callable[[argparse.Namespace, Path], None],
               evaluate_only: Callable[[argparse.Namespace, Path], None],
               check: Callable[[], Any] | None = None) -> int:
    """A recipe's ``main`` after parsing: refuse to replace a non-empty --out without --overwrite (or to evaluate a
    folder this recipe did not write), run ``check`` (a program the data need) before torch is imported, then train
    or evaluate with --threads torch threads (restored after). A MissingPackageError is a message and status 2."""
    out: Path = args.out
    if args.evaluate_only and not (out / "training.json").is_file():
        return _error(f"--evaluate-only needs a model trained by this recipe in {out} (no training.json there)")
    if not args.evaluate_only and out.exists() and any(out.iterdir()) and not args.overwrite:
        return _error(f"{out} exists and is not empty; pass --overwrite to replace it")
    if check is not None:
        try:
            check()  # before any heavy import or training: the data come first
        except MissingPackageError as exc:
            return _error(str(exc))
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        (evaluate_only if args.evaluate_only else train)(args, out)
        return 0
    except MissingPackageError as exc:
        return _error(str(exc))
    finally:
        torch.set_num_threads(threads)


# -- training ----------------------------------------------------------------------------------------------------

def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then a half cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _report_rate(bar: Any, stage: str, step: int, start: float, total: int) -> None:
    rate = (step + 1) / (time.perf_counter() - start)
    bar.write(f"{stage}: {rate:.2f} steps/s over the first {step + 1} steps "
              f"(about {total / rate / 60:.1f} min for {total} steps)")


def _log_stage(log: dict, stage: str, steps: int, start: float) -> None:
    log[f"{stage}_seconds"] = round(time.perf_counter() - start, 1)
    log[f"{stage}_steps_per_second"] = round(steps / max(log[f"{stage}_seconds"], 1e-9), 2)


def train_vae(vae_config: dict, x_train: Any, args: argparse.Namespace, gen: Any, log: dict, *, warmup: int,
              batch_size: int) -> Any:
    """AutoencoderKL(``vae_config``) from ``--seed``: AdamW at --vae-lr, ``warmup`` steps then cosine to 5 %, L1
    reconstruction of a sampled latent + --kl-weight KL; batches and latents drawn from ``gen``. Eval mode."""
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = time.perf_counter()
    bar = tqdm(range(args.vae_steps), desc="vae", unit="step", dynamic_ncols=True, mininterval=5.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, warmup, args.vae_lr, args.vae_lr * 0.05)
        x = x_train[torch.randint(0, len(x_train), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = (recon - x).abs().mean()
        loss = rec + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(l1=f"{rec.item():.4f}")
        if step == min(29, args.vae_steps - 1):
            _report_rate(bar, "vae", step, start, args.vae_steps)
    _log_stage(log, "vae", args.vae_steps, start)
    return vae.eval()


def encode_latents(vae: Any, x: Any, batch: int) -> tuple[Any, Any]:
    """(means, stds) of the VAE's posterior over ``x``, encoded ``batch`` at a time."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            dist = vae.encode(x[i:i + batch]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def scale_latents(vae: Any, x_train: Any, x_held: Any, gen: Any, log: dict, *, batch: int) -> tuple[Any, Any]:
    """Set the VAE's ``scaling_factor`` to 1 / std of one draw (from ``gen``) of the training latents and log the
    held-out reconstruction error; returns the scaled (means, stds) of the training latents the UNet learns."""
    import torch

    latent_mean, latent_std = encode_latents(vae, x_train, batch)
    sampled = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=gen)
    scaling = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling)
    log["vae_scaling_factor"] = scaling
    with torch.no_grad():
        held_mean, _ = encode_latents(vae, x_held, batch)
        recon = torch.cat([vae.decode(held_mean[i:i + batch]).sample for i in range(0, len(held_mean), batch)])
    mse01 = float(((recon.clamp(-1, 1) - x_held) / 2).square().mean())
    log["vae_heldout_mse_01"] = round(mse01, 5)
    log["vae_heldout_psnr_db"] = round(10 * math.log10(1 / mse01), 2)
    return latent_mean * scaling, latent_std * scaling


def train_unet(unet_class: type, unet_config: dict, ddpm_config: dict, latent_mean: Any, latent_std: Any,
               args: argparse.Namespace, gen: Any, log: dict, *, warmup: int,
               context: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """``unet_class(**unet_config)`` from ``--seed`` + 1 on latents z0 ~ N(mean, std): epsilon prediction under
    DDPMScheduler(``ddpm_config``), AdamW at --lr, ``warmup`` steps then cosine to 10 %, gradients clipped at 1,
    EMA with decay min(--ema-decay, (1 + step) / (10 + step)). ``context(idx)`` gives the cross-attention context
    of the batch's rows ``idx`` (drawing from ``gen`` after z0, before the noise); None: unconditional.
    Returns (EMA UNet in eval mode, DDPM scheduler)."""
    import copy

    import torch
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    torch.manual_seed(args.seed + 1)
    unet = unet_class(**unet_config)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**ddpm_config)
    alphas_cumprod = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    start = time.perf_counter()
    bar = tqdm(range(args.unet_steps), desc="unet", unit="step", dynamic_ncols=True, mininterval=5.0)
    running = None
    for step in bar:
        lr = cosine_lr(step, args.unet_steps, warmup, args.lr, args.lr * 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latent_mean), (args.batch_size,), generator=gen)
        z0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        condition = {} if context is None else {"encoder_hidden_states": context(idx)}
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(zt, t, **condition).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
        if step == min(49, args.unet_steps - 1):
            _report_rate(bar, "unet", step, start, args.unet_steps)
    _log_stage(log, "unet", args.unet_steps, start)
    log["unet_final_loss_ema"] = round(running, 5)
    return ema.eval(), scheduler


# -- the saved folder --------------------------------------------------------------------------------------------

def save_model_folder(out: Path, *, unet: Any, vae: Any, ddpm: Any, dtype: str, pipeline_class: str,
                      vae_folder: str = "vae", notes: dict[str, str] | None = None,
                      extra_components: dict[str, Any] | None = None) -> None:
    """Replace ``out`` with a diffusers folder: unet/ and ``vae_folder``/ as ``dtype`` safetensors, the DDIM
    scheduler/ that samples them (``ddpm``'s schedule), and model_index.json naming ``pipeline_class``, with
    ``notes`` (keys starting with ``_``) on what is not a diffusers component and ``extra_components`` (model_index
    entries such as ``"safety_checker": [None, None]``)."""
    import diffusers
    from diffusers import DDIMScheduler

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # nn.Module.half / float rather than ModelMixin.to(dtype), which warns about modules kept in float32 (none here)
    cast = (lambda m: m.half()) if dtype == "float16" else (lambda m: m.float())
    cast(unet).save_pretrained(out / "unet", safe_serialization=True)
    cast(vae).save_pretrained(out / vae_folder, safe_serialization=True)
    DDIMScheduler.from_config(ddpm.config, **DDIM_EXTRA).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        **(notes or {}),
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", type(unet).__name__],
        vae_folder: ["diffusers", type(vae).__name__],
        **(extra_components or {}),
    }, indent=2, sort_keys=True) + "\n")


def parameter_counts(unet: Any, vae: Any) -> dict[str, int]:
    return {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


def training_record(module: str, args: argparse.Namespace, log: dict, *, data: dict, params: dict[str, int],
                    **sections: Any) -> dict[str, Any]:
    """training.json of ``zoo/recipes/<module>.py``: the command and its arguments, ``data``, the recipe's own
    ``sections``, parameter counts, what was measured (``log``) and the machine."""
    import diffusers
    import torch

    return {
        "recipe": f"zoo/recipes/{module}.py",
        "command": f"python -m ldpruner.zoo.recipes.{module} " + " ".join(sys.argv[1:]),
        "args": {k: json_safe(v) for k, v in vars(args).items()},
        "data": data,
        **sections,
        "params": params,
        "measured": log,
        "machine": {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads,
                    "cpu": platform.processor() or platform.machine()},
    }


def reread_training(out: Path, args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """--out's training.json for --evaluate-only, its arguments ``names`` replaced by this command's."""
    training = read_json(out / "training.json", what="training record", error=ConfigError)
    training["args"].update({name: json_safe(getattr(args, name)) for name in names})
    return training


def write_training_and_card(out: Path, training: dict, model_card: Callable[[dict], str]) -> None:
    write_json_atomic(out / "training.json", training)
    (out / "README.md").write_text(model_card(training))


# -- model card --------------------------------------------------------------------------------------------------

def card_command(training: dict) -> str:
    """The card's paragraphs on the saved weights and the command that trained them, and the timing table's head."""
    args = argparse.Namespace(**training["args"])
    machine = training["machine"]
    return f"""Weights are stored as {args.dtype} safetensors; diffusers loads them as float32. VAE `scaling_factor` =
{training['measured']['vae_scaling_factor']:.4f} (1 / std of the sampled training latents).

## Training (measured here)
Command: `{training['command']}` (seed {args.seed}, torch threads {args.threads}, {machine['cpu']},
torch {machine['torch']}, diffusers {machine['diffusers']}, CPU only, on a 2-core
machine shared with other jobs).

| stage | steps × batch | time | rate |
|---|---|---|---|"""


def card_training_metrics(measured: dict, held_out: str) -> str:
    """The card's lines on the VAE's reconstruction of the ``held_out`` data and the UNet's final loss."""
    return f"""- VAE reconstruction of the held-out {held_out}: MSE {measured['vae_heldout_mse_01']} on the [0, 1] scale
  (PSNR {measured['vae_heldout_psnr_db']} dB).
- Final UNet loss (noise MSE, running mean): {measured['unet_final_loss_ema']}."""


def notes_section(notes: list[str] | None) -> str:
    """What a person saw in the samples: ``notes`` in training.json, written by hand, not by a recipe."""
    if not notes:
        return ""
    return "## Looked at by hand\n" + "".join(f"- {n}\n" for n in notes) + "\n"
