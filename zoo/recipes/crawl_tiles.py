"""Recipe for the zoo model ``crawl-tiles``: an unconditional latent diffusion model on Dungeon Crawl tiles.

Data (``ldpruner.zoo.datasets``, shared with the metrics): the 32×32 sprites of the four tile atlases of Debian
``crawl-tiles-data`` (main = monsters and items, floor, wall, feat); player.png (partial paper-doll overlays),
gui.png and icons.png (interface art), the logos, the program icons and the ~30 title illustrations are not tile
sheets and are skipped. Cells that are mostly transparent or flat are dropped, exact duplicates too; RGBA is
composited over black, then scaled to [-1, 1]. A tile is held out for evaluation when the first byte of the
SHA-256 of its RGB bytes is < 32 (1/8 of the tiles, independent of order); the rest train.

Stages: (1) AutoencoderKL 32×32×3 → 8×8×4, L1 + a small KL term; its latents' std sets ``scaling_factor``.
(2) UNet2DModel on the 8×8×4 latents, three levels (plain at 8×8, self-attention at 4×4 and 2×2 and in the
middle), epsilon prediction under DDPMScheduler's scaled-linear schedule; EMA weights are saved. (3) A
DDIMScheduler config, an ``LDMPipeline`` model_index.json (stock diffusers loads the folder), the model card,
the sample grid and FD/KID against the held-out tiles.

    python -m ldpruner.zoo.recipes.crawl_tiles --out zoo/crawl-tiles --overwrite

Needs ``apt-get install crawl-tiles-data`` and Pillow (``pip install 'ldpruner[zoo]'``). Results are reproducible
from ``--seed`` with the same torch version and thread count (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldpruner.zoo.datasets import (
    CRAWL_ATLASES,
    CRAWL_TILES_DIR,
    HOLDOUT_HASH_BELOW,
    MIN_ALPHA_COVERAGE,
    MIN_RGB_STD,
    TILE,
    load_crawl_tiles,
    split_crawl_tiles,
    tiles_to_model_range,
)

from . import _training, mnist_t2i
from ._training import notes_section

BACKGROUND = "black"

# mnist-t2i's autoencoder (32×32 → 8×8×4, channels (32, 64, 64)) on RGB instead of grey
VAE_CONFIG = {**mnist_t2i.VAE_CONFIG, "in_channels": 3, "out_channels": 3, "sample_size": TILE}
UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (48, 96, 96),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 24,  # UNet2DModel: width of a head (4 heads at 96 channels)
    "norm_num_groups": 16,
}
# Stable Diffusion's training schedule, as for mnist-t2i
DDPM_CONFIG = mnist_t2i.DDPM_CONFIG


def train_vae(x_train: Any, args: argparse.Namespace, gen: Any, log: dict) -> Any:
    return _training.train_vae(VAE_CONFIG, x_train, args, gen, log, warmup=min(100, args.vae_steps),
                               batch_size=args.batch_size)


def train_unet(latent_mean: Any, latent_std: Any, args: argparse.Namespace, gen: Any, log: dict) -> tuple[Any, Any]:
    """Train the UNet on sampled latents × scaling; returns (EMA UNet, DDPM scheduler)."""
    from diffusers import UNet2DModel

    return _training.train_unet(UNet2DModel, UNET_CONFIG, DDPM_CONFIG, latent_mean, latent_std, args, gen, log,
                                warmup=min(args.warmup, args.unet_steps))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _training.recipe_parser("crawl_tiles", __doc__, "crawl-tiles")
    p.add_argument("--tiles-dir", type=Path, default=CRAWL_TILES_DIR,
                   help="folder with the atlases main/floor/wall/feat.png (default: %(default)s)")
    _training.add_training_arguments(p, vae_steps=500, kl_weight=1e-6, unet_steps=3000)
    p.add_argument("--grid-size", type=int, default=8, help="samples.png is grid-size × grid-size samples")
    p.add_argument("--grid-steps", type=int, default=50, help="DDIM steps for samples.png and the metrics")
    p.add_argument("--eval-samples", type=int, default=500,
                   help="generated samples for FD/KID (0 skips them; needs the metrics: pip install "
                        "\'ldpruner[bench]\')")
    _training.add_output_arguments(p, evaluate_only_rewrites="its training.json and card")
    args = _training.parse_recipe_args(p, argv, positive=("grid_size", "grid_steps"))
    if args.eval_samples < 0:
        p.error(f"--eval-samples must be >= 0; got {args.eval_samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    return _training.run_recipe(parse_args(argv), train=_run, evaluate_only=_evaluate_only)


def _run(args: argparse.Namespace, out: Path) -> None:
    import torch

    wall = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {}

    tiles, sources = load_crawl_tiles(args.tiles_dir)
    train_idx, held_idx = split_crawl_tiles(tiles)
    x_train, x_held = tiles_to_model_range(tiles[train_idx]), tiles_to_model_range(tiles[held_idx])

    vae = train_vae(x_train, args, gen, log)
    latent_mean, latent_std = _training.scale_latents(vae, x_train, x_held, gen, log, batch=500)
    unet, ddpm = train_unet(latent_mean, latent_std, args, gen, log)
    log["train_seconds_total"] = round(time.perf_counter() - wall, 1)

    data = {
        "tiles_dir": str(args.tiles_dir),
        "atlases": {name: sources.count(name) for name in CRAWL_ATLASES},
        "filter": f"32x32 grid cells with >= {MIN_ALPHA_COVERAGE:.0%} nonzero alpha and RGB std > {MIN_RGB_STD:g}, "
                  f"exact RGBA duplicates dropped, composited over {BACKGROUND}",
        "split_rule": f"held out when the first byte of sha256(composited RGB bytes) < {HOLDOUT_HASH_BELOW} (1/8)",
        "tiles": len(tiles),
        "train_tiles": len(train_idx),
        "heldout_tiles": len(held_idx),
    }
    _save(out, args, vae, unet, ddpm, data, log)


def _save(out: Path, args: argparse.Namespace, vae: Any, unet: Any, ddpm: Any, data: dict, log: dict) -> None:
    from ldpruner.zoo.text_to_image import image_grid
    from ldpruner.zoo.unconditional import load_unconditional

    # LDMPipeline is stock diffusers' unconditional latent pipeline; its vqvae slot takes our AutoencoderKL (it
    # only calls decode and reads scaling_factor), so DiffusionPipeline.from_pretrained(out) works (with a type
    # warning about VQModel).
    _training.save_model_folder(out, unet=unet, vae=vae, ddpm=ddpm, dtype=args.dtype, pipeline_class="LDMPipeline",
                                vae_folder="vqvae")

    # Sample from the saved files, so the grid shows what is shipped (weights rounded to --dtype).
    model = load_unconditional(out)
    start = time.perf_counter()
    images = model.sample(args.grid_size ** 2, steps=args.grid_steps, seed=0)
    image_grid(images, columns=args.grid_size, scale=3).save(out / "samples.png")
    log["grid_seconds"] = round(time.perf_counter() - start, 1)

    params = _training.parameter_counts(model.unet, model.vae)
    training = _training.training_record("crawl_tiles", args, log, data=data, params=params)
    _evaluate_and_write(out, model, training)
    print(json.dumps({"out": str(out), "params": params, **log, "metrics": training.get("metrics")}, indent=2))


def _evaluate_only(args: argparse.Namespace, out: Path) -> None:
    from ldpruner.zoo.unconditional import load_unconditional

    training = _training.reread_training(out, args, ("eval_samples", "tiles_dir"))
    _evaluate_and_write(out, load_unconditional(out), training)
    print(json.dumps(training.get("metrics"), indent=2))


def _evaluate_and_write(out: Path, model: Any, training: dict) -> None:
    """Add the metrics (when ldpruner.bench.metrics is importable) to training.json; write it and the card."""
    a = training["args"]
    if a.get("eval_samples", 0) > 0:
        training["metrics"] = evaluate(model, n=a["eval_samples"], steps=a["grid_steps"],
                                       tiles_dir=Path(a["tiles_dir"]))
    _training.write_training_and_card(out, training, _model_card)


def evaluate(model: Any, *, n: int, steps: int, tiles_dir: Path = CRAWL_TILES_DIR) -> dict[str, Any]:
    """FD/KID on EfficientNet-Lite0 features of ``n`` samples against the held-out tiles, beside real vs real.

    Sample i uses seed 10,000 + i (never a grid seed). Real vs real: ``n`` training tiles (a fixed random choice)
    against the same held-out reference. The metrics live in ``ldpruner.bench.metrics`` (the ``[bench]`` extra); without it
    this returns why it was skipped.
    """
    try:
        from ldpruner.bench import metrics
    except ImportError as exc:
        return {"skipped": f"ldpruner.bench.metrics is not importable ({exc}); pip install 'ldpruner[bench]'"}
    start = time.perf_counter()
    tiles, _ = load_crawl_tiles(tiles_dir)
    train_idx, held_idx = split_crawl_tiles(tiles)
    if n > len(train_idx):
        raise ValueError(f"--eval-samples {n} is more than the {len(train_idx)} training tiles the real-vs-real "
                         f"baseline is measured with")
    generated = model.sample(n, steps=steps, seed=list(range(10_000, 10_000 + n)))
    base_idx = np.random.default_rng(0).permutation(train_idx)[:n]
    real_held = (tiles_to_model_range(tiles[held_idx]) + 1) / 2
    real_base = (tiles_to_model_range(tiles[base_idx]) + 1) / 2
    result: dict[str, Any] = {"samples": n, "ddim_steps": steps, "reference": len(held_idx)}
    try:
        q = metrics.image_quality(generated, real_held, real_base, extractor=metrics.ImageFeatureExtractor())
    except (ImportError, metrics.MissingMetricPackageError) as exc:
        result["quality"] = {"skipped": str(exc)}
    else:
        result["quality"] = {k: q[k] for k in ("fd", "fd_real_vs_real", "kid", "kid_real_vs_real", "n_generated",
                                               "n_reference", "n_baseline", "features", "note")}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _model_card(training: dict) -> str:
    args = argparse.Namespace(**training["args"])
    m = training["measured"]
    p = training["params"]
    d = training["data"]
    atlases = ", ".join(f"{name} {count:,}" for name, count in d["atlases"].items())
    return f"""# crawl-tiles — a small unconditional latent diffusion model on Dungeon Crawl tiles

An embedded model of ldpruner (`zoo:crawl-tiles`, task unconditional-image): a KL autoencoder and a UNet2DModel
with self-attention in its lower-resolution levels, DDIM sampling, trained on this machine from the sprite
atlases of a Debian package. It exists so that LD-Pruner can be shown on a trained unconditional model with no
model hub. The folder is a stock diffusers `LDMPipeline` (the autoencoder, an `AutoencoderKL`, sits in the
pipeline's `vqvae` slot; diffusers warns that it expected a `VQModel` and runs it anyway).

![samples](samples.png)

`samples.png`: {args.grid_size * args.grid_size} samples, seeds 0–{args.grid_size ** 2 - 1} row-major,
{args.grid_steps} DDIM steps, decoded by the VAE, shown at 3× (96×96).

## Data and licence
- Images: the Dungeon Crawl Stone Soup tile atlases in Debian `crawl-tiles-data` (2:0.28.0),
  `{d['tiles_dir']}/{{{','.join(CRAWL_ATLASES)}}}.png`. Only these four sheets of whole sprites are used; player.png
  (partial paper-doll overlays), gui.png, icons.png, the logos, program icons and title illustrations are not.
- Licence: most DCSS tiles are CC0 upstream (the rltiles lineage; see crawl's tiles README), a minority have
  unclear upstream licensing; as packaged by Debian they fall under crawl's copyright file (GPL-2+ and a mix
  of others). This model and its samples are derived from them: fine for evaluation, do not redistribute
  them as "CC0".
- Tiles: {d['filter']}: {d['tiles']:,} tiles ({atlases}).
- Split: {d['split_rule']}: {d['train_tiles']:,} training tiles, {d['heldout_tiles']:,} held out (not used for
  training either network).
- Preprocessing: RGBA over {BACKGROUND} → RGB 32×32, scaled to [-1, 1]. No augmentation.

## Architecture
| part | diffusers class | shape | params |
|---|---|---|---|
| autoencoder | `AutoencoderKL` (folder `vqvae/`) | 32×32×3 → 8×8×4 latent, channels {VAE_CONFIG['block_out_channels']} | {p['vae']:,} |
| denoiser | `UNet2DModel` | 8×8×4, levels {UNET_CONFIG['block_out_channels']}, `{'`, `'.join(UNET_CONFIG['down_block_types'])}` / mid `UNetMidBlock2D` (attention) / `{'`, `'.join(UNET_CONFIG['up_block_types'])}`, layers_per_block {UNET_CONFIG['layers_per_block']}, head width {UNET_CONFIG['attention_head_dim']} | {p['unet']:,} |
| scheduler | `DDPMScheduler` (training), `DDIMScheduler` (saved) | 1000 steps, scaled-linear betas 0.00085–0.012, epsilon prediction | – |

{_training.card_command(training)}
| AutoencoderKL, AdamW lr {args.vae_lr} cosine, L1 + {args.kl_weight} KL | {args.vae_steps} × {args.batch_size} | {m['vae_seconds']} s | {m['vae_steps_per_second']} steps/s |
| UNet, AdamW lr {args.lr} cosine, EMA {args.ema_decay} | {args.unet_steps} × {args.batch_size} | {m['unet_seconds']} s | {m['unet_steps_per_second']} steps/s |
| total training (data, VAE, UNet) | | {m['train_seconds_total'] / 60:.1f} min | |
| sample grid ({args.grid_size ** 2} samples × {args.grid_steps} steps) | | {m['grid_seconds']} s | |

## Metrics
{_training.card_training_metrics(m, "tiles")}
{_metrics_section(training.get("metrics"))}
{notes_section(training.get("notes"))}## Use
```python
from ldpruner.zoo import load_unconditional
model = load_unconditional("crawl-tiles")
images = model.sample(4, steps=25, seed=0)  # (4, 3, 32, 32) float32 in [0, 1]

import diffusers  # or with stock diffusers
pipe = diffusers.DiffusionPipeline.from_pretrained(model.folder)
pil_images = pipe(batch_size=4, num_inference_steps=25).images
```
Rebuild: `python -m ldpruner.zoo.recipes.crawl_tiles --out zoo/crawl-tiles --overwrite` (needs
`apt-get install crawl-tiles-data`); `--evaluate-only` recomputes the metrics and this card.
"""


def _metrics_section(metrics: dict | None) -> str:
    if not metrics:
        return "- Generated-sample metrics: not computed (--eval-samples 0).\n"
    if "skipped" in metrics:
        return f"- Generated-sample metrics: skipped, {metrics['skipped']}.\n"
    q = metrics["quality"]
    if "skipped" in q:
        return f"- FD/KID: skipped, {q['skipped']}.\n"
    kid, base = q["kid"], q["kid_real_vs_real"]
    return "\n".join([
        (f"- FD/KID on {q['features']} ({metrics['samples']} samples, seeds 10000–{10_000 + metrics['samples'] - 1},"
         f" {metrics['ddim_steps']} DDIM steps; computed in {metrics['seconds']} s):"),
        "",
        "| | FD | KID |",
        "|---|---|---|",
        f"| generated vs held-out tiles | {q['fd']:.4g} | {kid['mean']:.3g} ± {kid['std']:.2g} |",
        (f"| real vs real (training vs held-out tiles) | {q['fd_real_vs_real']:.4g} | "
         f"{base['mean']:.3g} ± {base['std']:.2g} |"),
        "",
        (f"Reference = the {metrics['reference']} held-out tiles; real vs real = {metrics['samples']} training tiles"
         " against the same reference. These numbers are relative (for dense vs pruned), not comparable to"
         " published FID/KID."),
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
