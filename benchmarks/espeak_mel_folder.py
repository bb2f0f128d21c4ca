"""A dataset folder of real espeak-digits mels, for distilling the audio zoo model on data (``--data``).

    python -m benchmarks.espeak_mel_folder --out build/espeak-mels --count 2000
    python -m benchmarks.distill_quality --models espeak-digits --budget 0.1 --distill-steps 3000 \\
        --data build/espeak-mels --out build/bench-distill-espeak-data

Takes ``--count`` clips of the ``ldm`` split (the model's own training clips; never the ``eval`` clips the metrics
use), chosen by a seeded permutation, and writes each 64×64 log-mel (mels along the height, frames along the
width) as an 8-bit greyscale PNG: [-1, 1] → 0–255, exactly how ``ldpruner distill --data`` reads images back.
Needs Debian ``espeak-ng`` (``apt-get install espeak-ng``) and librosa, like the recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_folder(out: Path, count: int, seed: int = 0, cache_dir: Path | None = None) -> int:
    import numpy as np
    from PIL import Image

    from ldpruner.zoo.datasets import load_espeak_split

    mels, _ = load_espeak_split("ldm", cache_dir=cache_dir, progress=True)
    if not 1 <= count <= len(mels):
        raise SystemExit(f"--count must be between 1 and {len(mels)} (the ldm split); got {count}")
    out.mkdir(parents=True, exist_ok=True)
    for i in np.random.default_rng(seed).permutation(len(mels))[:count]:
        pixels = np.clip((mels[i, 0] + 1) * 127.5, 0, 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(out / f"{i:05d}.png")
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, help="keep the synthesised split here (espeak-ng is slow)")
    args = p.parse_args(argv)
    n = write_folder(args.out, args.count, args.seed, args.cache_dir)
    print(f"wrote {n} mel PNGs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
