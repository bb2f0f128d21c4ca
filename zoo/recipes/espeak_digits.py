"""Recipe for the zoo model ``espeak-digits``: an unconditional mel-spectrogram LDM of spoken digits, from a seed.

Data (``ldpruner.zoo.datasets``, shared with the metrics): the ten English digit words spoken by the Debian
package ``espeak-ng`` (GPL-3+; the audio it outputs is free to use) with random voices, pitches and speeds,
resampled to 16 kHz and turned into 64 × 64 log-mel images in [-1, 1] by ``ldpruner.zoo.audio`` (the definition the
sampler and the metrics use too). Three disjoint synthetic splits, each with the digits balanced: ``ldm`` trains
this model, ``classifier`` trains the spoken-digit classifier of ``ldpruner.bench.metrics.spoken_digits``, ``eval``
is held out from both (the classifier's accuracy, the reference set and the real-vs-real baseline of FD/KID).

Stages: (1) AutoencoderKL 64×64×1 mel → 16×16×4 latent, L1 + a small KL term; the latents' std sets
``scaling_factor``. (2) UNet2DModel on the latents: three levels (16×16 plain, 8×8 and 4×4 with self-attention),
epsilon prediction under a DDPMScheduler (linear betas), EMA weights saved. (3) A DDIMScheduler config, ``mel.json``,
the sample grid (generated mels beside real held-out ones), a few Griffin-Lim WAVs, metrics, the model card.

    python -m ldpruner.zoo.recipes.espeak_digits --out zoo/espeak-digits --overwrite

Needs: Debian ``espeak-ng`` (``apt-get install espeak-ng``) and ``pip install 'ldpruner[zoo]'`` (librosa, scipy).
Results are reproducible from ``--seed`` with the same torch version and thread count (``--threads``); the data
do not depend on ``--seed`` (``ESPEAK_DATA_SEED``), so the classifier and every seed's model see the same splits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldpruner.zoo.datasets import (
    DIGIT_WORDS,
    ESPEAK_ACCENTS,
    ESPEAK_DATA_SEED,
    ESPEAK_PITCH_RANGE,
    ESPEAK_SPEED_RANGE,
    ESPEAK_SPLITS,
    ESPEAK_VARIANTS,
    check_espeak,
    load_espeak_split,
)

from . import _training
from ._training import notes_section

# -- model -------------------------------------------------------------------------------------------------------

MEL_SIZE = 64
VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": MEL_SIZE,
}
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,  # UNet2DModel: the width of one head
    "norm_num_groups": 16,
}
# DDPM's linear schedule (Ho et al. 2020)
DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
               "prediction_type": "epsilon", "clip_sample": False}
GRID_GENERATED = 32  # samples.png: 4 rows of generated mels, then one row of real held-out ones
WAV_SAMPLES = 8


def train_vae(x_train: Any, args: argparse.Namespace, gen: Any, log: dict) -> Any:
    return _training.train_vae(VAE_CONFIG, x_train, args, gen, log, warmup=50, batch_size=args.vae_batch_size)


def train_unet(latent_mean: Any, latent_std: Any, args: argparse.Namespace, gen: Any, log: dict) -> tuple[Any, Any]:
    """Train the UNet on sampled (scaled) latents; returns (EMA UNet, DDPM scheduler)."""
    from diffusers import UNet2DModel

    return _training.train_unet(UNet2DModel, UNET_CONFIG, DDPM_CONFIG, latent_mean, latent_std, args, gen, log,
                                warmup=args.warmup)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _training.recipe_parser("espeak_digits", __doc__, "espeak-digits")
    p.add_argument("--espeak", default="espeak-ng", help="the espeak-ng executable (default: %(default)s)")
    p.add_argument("--data-cache", type=Path, default=None,
                   help="keep the synthesised splits here as .npz (keyed by their settings) and reuse them")
    _training.add_training_arguments(p, vae_steps=500, kl_weight=1e-5, unet_steps=2400, vae_batch_size=32)
    p.add_argument("--grid-steps", type=int, default=25, help="DDIM steps for samples.png, the WAVs and the metrics")
    p.add_argument("--griffin-lim-iters", type=int, default=64, help="Griffin-Lim iterations for the WAVs")
    p.add_argument("--eval-samples", type=int, default=500,
                   help="generated clips for the metrics (0 skips them; needs the metrics: pip install "
                        "'ldpruner[bench]')")
    _training.add_output_arguments(p, evaluate_only_rewrites="samples, WAVs, training.json and the card")
    args = _training.parse_recipe_args(p, argv, positive=("vae_batch_size", "grid_steps", "griffin_lim_iters"))
    if not 0 <= args.eval_samples <= ESPEAK_SPLITS["eval"][1] // 2:
        p.error(f"--eval-samples must be in [0, {ESPEAK_SPLITS['eval'][1] // 2}] (half the eval split is the reference, "
                f"half the real-vs-real baseline); got {args.eval_samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return _training.run_recipe(args, train=_run, evaluate_only=_evaluate_only,
                                check=lambda: check_espeak(args.espeak))


def _evaluate_only(args: argparse.Namespace, out: Path) -> None:
    training = _training.reread_training(out, args, ("eval_samples", "grid_steps", "griffin_lim_iters"))
    _finish(out, training, args)


def _run(args: argparse.Namespace, out: Path) -> None:
    import torch

    from ldpruner.zoo.audio import MEL_CONFIG_FILE, MelConfig

    wall = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {}
    config = MelConfig()

    start = time.perf_counter()
    mels, _ = load_espeak_split("ldm", config=config, executable=args.espeak, cache_dir=args.data_cache, progress=True)
    held, _ = load_espeak_split("eval", config=config, executable=args.espeak, cache_dir=args.data_cache, progress=True)
    log["data_seconds"] = round(time.perf_counter() - start, 1)
    x_train, x_held = torch.from_numpy(mels), torch.from_numpy(held)

    vae = train_vae(x_train, args, gen, log)
    latent_mean, latent_std = _training.scale_latents(vae, x_train, x_held, gen, log, batch=250)
    unet, ddpm = train_unet(latent_mean, latent_std, args, gen, log)
    log["train_seconds_total"] = round(time.perf_counter() - wall, 1)

    notes = {"_mel": f"{MEL_CONFIG_FILE}: the log-mel settings of the 64x64 images the model generates; turn them "
                     "into audio with ldpruner.zoo.audio.mel_to_waveform (Griffin-Lim, needs librosa)"}
    _training.save_model_folder(out, unet=unet, vae=vae, ddpm=ddpm, dtype=args.dtype,
                                pipeline_class="LdprunerZooUnconditionalAudio", notes=notes)
    (out / MEL_CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    training = _training.training_record("espeak_digits", args, log, data=_data_record(len(mels)),
                                         params=_training.parameter_counts(unet, vae), mel=config.to_json())
    _finish(out, training, args)


def _data_record(n_ldm: int) -> dict[str, Any]:
    exe = shutil.which("espeak-ng")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout.strip() if exe else None
    return {
        "source": "Debian espeak-ng (GPL-3+), run as a subprocess; the speech it outputs is free to use",
        "espeak_ng": version,
        "words": list(DIGIT_WORDS),
        "accents": list(ESPEAK_ACCENTS),
        "variants": list(ESPEAK_VARIANTS),
        "pitch_range": list(ESPEAK_PITCH_RANGE),
        "speed_range_wpm": list(ESPEAK_SPEED_RANGE),
        "data_seed": ESPEAK_DATA_SEED,
        "splits": {name: {"generator": [ESPEAK_DATA_SEED, number], "clips": count} for name, (number, count) in ESPEAK_SPLITS.items()},
        "ldm_clips": n_ldm,
        "preprocessing": "22,050 Hz -> 16 kHz (scipy resample_poly 320/441), silence trimmed (1 % of peak), "
                         "peak 0.9, starts 50 ms into a 16,128-sample clip (1.008 s)",
    }


def _finish(out: Path, training: dict, args: argparse.Namespace) -> None:
    """From the saved folder: samples.png, samples/*.wav, the metrics, training.json and the model card."""
    import torch

    from ldpruner.zoo.audio import MelConfig, mel_to_waveform
    from ldpruner.zoo.text_to_image import image_grid
    from ldpruner.zoo.unconditional import load_unconditional

    a = training["args"]
    log = training["measured"]
    config = MelConfig.from_folder(out)
    model = load_unconditional(out)
    cache = a.get("data_cache")
    held, held_digits = load_espeak_split("eval", config=config, executable=a.get("espeak", "espeak-ng"), cache_dir=cache)

    start = time.perf_counter()
    generated = model.sample(GRID_GENERATED, steps=a["grid_steps"], seed=0)
    real = (torch.from_numpy(held[:8]) + 1) / 2  # eval clips 0-7 say the digits 0-7
    # low frequencies at the bottom, as spectrograms are usually drawn
    image_grid(torch.cat([generated, real]).flip(-2), columns=8, scale=2).save(out / "samples.png")
    log["grid_seconds"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    audio = mel_to_waveform(generated[:WAV_SAMPLES], config, value_range=(0.0, 1.0), n_iter=a["griffin_lim_iters"])
    wav_dir = out / "samples"
    if wav_dir.exists():
        shutil.rmtree(wav_dir)
    wav_dir.mkdir()
    for i, clip in enumerate(audio):
        _write_wav(wav_dir / f"sample_{i}.wav", clip, config.sample_rate)
    log["wav_seconds"] = round(time.perf_counter() - start, 1)

    if a.get("eval_samples", 0) > 0:
        training["metrics"] = evaluate(model, held, held_digits, config, n=a["eval_samples"], steps=a["grid_steps"],
                                       griffin_lim_iters=a["griffin_lim_iters"], wav_mels=generated[:WAV_SAMPLES])
    _training.write_training_and_card(out, training, _model_card)


def _write_wav(path: Path, clip: np.ndarray, rate: int) -> None:
    from scipy.io import wavfile

    wavfile.write(path, rate, np.round(np.clip(clip, -1.0, 1.0) * 32767).astype(np.int16))


def evaluate(model: Any, held: np.ndarray, held_digits: np.ndarray, config: Any, *, n: int, steps: int,
             griffin_lim_iters: int, wav_mels: Any) -> dict[str, Any]:
    """Recognisability, digit coverage and FD/KID of ``n`` generated clips (seeds 10,000 + i, never a grid seed)
    against the held-out ``eval`` split, beside real clips and noise; and whether Griffin-Lim keeps the digit.

    The eval split says the digits 0–9 in turn, so its clips come in blocks of ten: reference = the even-numbered
    blocks, real-vs-real baseline = the first ``n`` clips of the odd-numbered blocks (both digit-balanced, disjoint). The metrics live in ``ldpruner.bench.metrics`` (the ``[bench]`` extra); without it this
    returns why it was skipped.
    """
    import torch

    from ldpruner.zoo.audio import mel_to_waveform, waveform_to_mel

    try:
        from ldpruner.bench.metrics import spoken_digits as sd
    except ImportError as exc:
        return {"skipped": f"ldpruner.bench.metrics is not importable ({exc}); pip install 'ldpruner[bench]'"}
    start = time.perf_counter()
    classifier = sd.load_spoken_digit_classifier()
    generated = model.sample(n, steps=steps, seed=[10_000 + i for i in range(n)])
    unit = (torch.from_numpy(held) + 1) / 2
    block = (torch.arange(len(unit)) // 10) % 2 == 0
    reference, baseline = unit[block], unit[~block][:n]
    noise = sd.noise_mels(n, seed=0, config=config)
    result: dict[str, Any] = {
        "samples": n,
        "ddim_steps": steps,
        **sd.spoken_digit_quality(generated, reference, baseline, noise=noise, classifier=classifier),
        "classifier": {"weights": "bench/assets/spoken_digit_classifier.safetensors",
                       "heldout_accuracy": classifier.record.get("heldout_accuracy"),
                       "n_heldout": classifier.record.get("n_heldout")},
    }
    result["classifier"]["accuracy_on_eval_split_here"] = float(
        (sd.spoken_digit_probabilities(unit, classifier=classifier).argmax(1) == torch.from_numpy(held_digits))
        .double().mean())
    # Griffin-Lim: does the digit survive mel -> audio -> mel? Real clips (labelled) and the WAVs written here.
    k = min(50, len(held))
    real_audio = mel_to_waveform(unit[:k], config, value_range=(0.0, 1.0), n_iter=griffin_lim_iters)
    real_again = (torch.from_numpy(waveform_to_mel(real_audio, config)) + 1) / 2
    real_pred = sd.spoken_digit_probabilities(real_again, classifier=classifier).argmax(1)
    wav_audio = mel_to_waveform(wav_mels, config, value_range=(0.0, 1.0), n_iter=griffin_lim_iters)
    wav_again = (torch.from_numpy(waveform_to_mel(wav_audio, config)) + 1) / 2
    before = sd.spoken_digit_probabilities(wav_mels, classifier=classifier)
    after = sd.spoken_digit_probabilities(wav_again, classifier=classifier)
    result["griffin_lim"] = {
        "iterations": griffin_lim_iters,
        "real_clips": k,
        "real_accuracy_after_round_trip": float((real_pred == torch.from_numpy(held_digits[:k])).double().mean()),
        "wav_samples": int(wav_mels.shape[0]),
        "wav_digit_before": [int(d) for d in before.argmax(1)],
        "wav_confidence_before": [round(float(c), 3) for c in before.max(1).values],
        "wav_digit_after_round_trip": [int(d) for d in after.argmax(1)],
        "wav_confidence_after_round_trip": [round(float(c), 3) for c in after.max(1).values],
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result



def _metrics_section(metrics: dict | None) -> str:
    if not metrics:
        return "- Generated-clip metrics: not computed (--eval-samples 0).\n"
    if "skipped" in metrics:
        return f"- Generated-clip metrics: skipped, {metrics['skipped']}.\n"
    r = metrics["recognisability"]
    c = metrics["classifier"]
    g = metrics["griffin_lim"]
    rows = []
    for key, label in (("generated", f"generated ({metrics['ddim_steps']} DDIM steps)"),
                       ("real_heldout", "real held-out clips"), ("noise", "white-noise clips")):
        if key in r:
            q = r[key]
            rows.append(f"| {label} | {q['n']} | {q['recognised']['0.5']:.1%} | {q['recognised']['0.9']:.1%} | "
                        f"{q['entropy_bits']:.2f} | {' '.join(str(h) for h in q['histogram'])} |")
    agree = sum(b == a for b, a in zip(g["wav_digit_before"], g["wav_digit_after_round_trip"]))
    lines = [
        (f"The spoken-digit classifier of `bench/metrics/spoken_digits.py` (trained here on the `classifier` "
         f"split, never seen by this model) reads the held-out `eval` split with **{c['heldout_accuracy']:.1%}** "
         f"accuracy. The model has no prompt, so the metrics ask whether a clip says *some* digit clearly, which "
         f"digits come out, and how far the clips are from real ones:"),
        "",
        "| clips | n | top digit p ≥ 0.5 | p ≥ 0.9 | entropy of recognised digits (bits, max 3.32) | histogram 0–9 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| features | FD generated vs held-out | FD real vs real | KID generated | KID real vs real |",
        "|---|---|---|---|---|",
        (f"| {metrics['features']} | {metrics['fd']:.4g} | {metrics['fd_real_vs_real']:.4g} | "
         f"{metrics['kid']['mean']:.3g} ± {metrics['kid']['std']:.2g} | "
         f"{metrics['kid_real_vs_real']['mean']:.3g} ± {metrics['kid_real_vs_real']['std']:.2g} |"),
        "",
        (f"n = {metrics['n_generated']} generated (seeds 10,000 + i); reference = the {metrics['n_reference']} "
         f"`eval` clips of its even-numbered blocks of ten (one clip per digit each); real vs real = "
         f"{metrics['n_baseline']} clips of the odd-numbered blocks against the same reference. Relative numbers (for dense vs pruned), not comparable to any published metric."),
        "",
        (f"Griffin-Lim ({g['iterations']} iterations): real held-out mels turned into audio and back are still "
         f"classified correctly {g['real_accuracy_after_round_trip']:.0%} of the time ({g['real_clips']} clips); "
         f"for the {g['wav_samples']} WAVs in `samples/`, the digit heard in the re-computed mel equals the one in "
         f"the generated mel for {agree} of {g['wav_samples']} (digits {g['wav_digit_after_round_trip']}). Nobody "
         "listened to them here; this check is the classifier's ear."),
        "",
        f"Computed at the end of the recipe (alone: `--evaluate-only`) in {metrics['seconds']} s.",
        "",
    ]
    return "\n".join(lines)


def _model_card(training: dict) -> str:
    args = argparse.Namespace(**training["args"])
    m = training["measured"]
    p = training["params"]
    d = training["data"]
    mel = training["mel"]
    splits = ", ".join(f"`{k}` {v['clips']:,}" for k, v in d["splits"].items())
    return f"""# espeak-digits — a small unconditional latent diffusion model of spoken digits (mel spectrograms)

An embedded model of ldpruner (`zoo:espeak-digits`, task unconditional-audio): a KL autoencoder and a UNet2DModel
with self-attention in its lower levels that generate 64×64 log-mel spectrograms of the spoken words "zero" …
"nine" (about 1 s of 16 kHz audio), trained on this machine from speech synthesised by Debian `espeak-ng`. It
exists so that LD-Pruner can be shown on a trained audio diffusion model with no model hub.

![samples](samples.png)

`samples.png`: rows 1–4 are generated mels (seeds 0–{GRID_GENERATED - 1}, {args.grid_steps} DDIM steps), row 5 real
held-out clips saying 0–7; time runs left to right, low frequencies at the bottom, shown at 2×. Listen to
`samples/sample_0.wav` … `sample_{WAV_SAMPLES - 1}.wav`: the first {WAV_SAMPLES} generated mels (seeds
0–{WAV_SAMPLES - 1}) turned into 16 kHz mono audio by Griffin-Lim ({args.griffin_lim_iters} iterations; expect the
metallic sound of phase reconstruction).

## Data and licences
- Speech: the ten digit words spoken by `{d['espeak_ng'].split('  ')[0] if d['espeak_ng'] else 'espeak-ng'}`
  (Debian package `espeak-ng`, GPL-3+; the audio it outputs is not covered by the GPL and is free to use).
  Voices: {len(d['accents'])} English accents ({', '.join(d['accents'])}) × {len(d['variants'])} voice variants
  ({', '.join(d['variants'])}); pitch `-p` uniform in {d['pitch_range']}, speed `-s` uniform in
  {d['speed_range_wpm']} words per minute, all drawn from numpy generators seeded with (data seed
  {d['data_seed']}, split).
- Splits (disjoint, each digit-balanced): {splits} clips. `ldm` trains this model, `classifier` trains the
  spoken-digit classifier used by the metrics, `eval` is held out from both.
- Preprocessing: {d['preprocessing']}; log-mel {mel['n_mels']} bands × {mel['n_frames']} frames (n_fft
  {mel['n_fft']}, hop {mel['hop_length']}, {mel['fmin']:g}–{mel['fmax']:g} Hz, librosa Slaney filters), dB clipped
  to [{mel['db_min']:g}, {mel['db_max']:g}] and mapped to [-1, 1] (`mel.json`, `ldpruner/zoo/audio.py`).

## Architecture
| part | diffusers class | shape | params |
|---|---|---|---|
| autoencoder | `AutoencoderKL` | 64×64×1 mel → 16×16×4 latent, channels {VAE_CONFIG['block_out_channels']} | {p['vae']:,} |
| denoiser | `UNet2DModel` | 16×16×4, levels {UNET_CONFIG['block_out_channels']}, `{'`, `'.join(UNET_CONFIG['down_block_types'])}` / mid with attention / `{'`, `'.join(UNET_CONFIG['up_block_types'])}`, layers_per_block {UNET_CONFIG['layers_per_block']}, head width {UNET_CONFIG['attention_head_dim']} | {p['unet']:,} |
| scheduler | `DDPMScheduler` (training), `DDIMScheduler` (saved) | 1000 steps, linear betas 0.0001–0.02, epsilon prediction | – |
| mel → audio | librosa `mel_to_stft` + `griffinlim` | 64×64 mel → 16,128 samples at 16 kHz | – |

Weights are stored as {args.dtype} safetensors; diffusers loads them as float32. VAE `scaling_factor` =
{m['vae_scaling_factor']:.4f} (1 / std of the sampled training latents).

## Training (measured here)
Command: `{training['command']}` (seed {args.seed}, torch threads {args.threads}, {training['machine']['cpu']},
torch {training['machine']['torch']}, diffusers {training['machine']['diffusers']}, CPU only, on a 2-core machine
shared with other jobs, so the times are pessimistic).

| stage | steps × batch | time | rate |
|---|---|---|---|
| espeak-ng synthesis + mels of the `ldm` and `eval` splits (or read from `--data-cache`) | – | {m['data_seconds']} s | – |
| AutoencoderKL, AdamW lr {args.vae_lr}, L1 + {args.kl_weight} KL | {args.vae_steps} × {args.vae_batch_size} | {m['vae_seconds']} s | {m['vae_steps_per_second']} steps/s |
| UNet, AdamW lr {args.lr} cosine, EMA {args.ema_decay} | {args.unet_steps} × {args.batch_size} | {m['unet_seconds']} s | {m['unet_steps_per_second']} steps/s |
| total training (data, VAE, UNet) | | {m['train_seconds_total'] / 60:.1f} min | |
| sample grid ({GRID_GENERATED} mels × {args.grid_steps} steps) | | {m.get('grid_seconds', '–')} s | |
| {WAV_SAMPLES} WAVs by Griffin-Lim | | {m.get('wav_seconds', '–')} s | |

## Metrics
{_training.card_training_metrics(m, "`eval` mels")}

{_metrics_section(training.get("metrics"))}
{notes_section(training.get("notes"))}## Reproduce
```
apt-get install espeak-ng && pip install 'ldpruner[zoo]'
python -m ldpruner.bench.metrics.spoken_digits --train --seed 0        # the metrics' classifier (committed)
python -m ldpruner.zoo.recipes.espeak_digits --out zoo/espeak-digits --overwrite --seed {args.seed}
```

## Use
```python
from ldpruner.zoo import load_unconditional
from ldpruner.zoo.audio import MelConfig, mel_to_waveform
model = load_unconditional("espeak-digits")
mels = model.sample(4, steps=25, seed=0)                     # (4, 1, 64, 64) log-mel images in [0, 1]
audio = mel_to_waveform(mels, MelConfig.from_folder(model.folder), value_range=(0, 1))  # (4, 16128) at 16 kHz
```
"""

if __name__ == "__main__":
    raise SystemExit(main())
