"""Every precondition of a bench run that its files and this machine decide, checked before the first model is
analysed: the quality of a zoo model needs packages and Debian data (espeak-ng, crawl-tiles-data) that a minimal
install lacks, a pipeline folder's text encoder must be safetensors, a distillation dataset folder must hold images.
Without this a missing program would be found after the analysis, the exports and the dense samples."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldpruner.config import BenchConfig
from ldpruner.errors import BenchError

__all__ = ["check_bench_inputs"]


def check_bench_inputs(config: BenchConfig, objects: Mapping[str, Any] | None = None) -> None:
    """Raise the first refusal a bench run of ``config`` would meet before any model is loaded (``objects``: the
    models given in memory, which need no check)."""
    from ldpruner.build import is_build_folder, read_build_folder
    from ldpruner.passes.conditioning import check_text_encoder
    from ldpruner.sources import ZOO_PREFIX

    from .quality import QUALITY_MODELS, missing_requirements

    for spec in config.models:
        if objects and spec in objects:
            continue
        if is_build_folder(spec):  # a finished build, unchanged; its model is checked like any other
            spec = read_build_folder(spec).config.model
        name = spec.removeprefix(ZOO_PREFIX)
        if config.quality and spec.startswith(ZOO_PREFIX) and name in QUALITY_MODELS:
            missing = missing_requirements(name)
            if missing:
                raise BenchError(f"quality of {spec} needs what this machine lacks: {' and '.join(missing)}; "
                                 f"install {'them' if len(missing) > 1 else 'it'}, or pass --no-quality "
                                 "(quality=False)")
        folder = Path(spec)
        if not spec.startswith(ZOO_PREFIX) and (folder / "model_index.json").is_file() and (
                folder / "text_encoder").is_dir():
            check_text_encoder(folder)
    if config.distill_data is not None and config.distill_steps:
        from ldpruner.passes.distill.datasets import folder_captions

        folder_captions(Path(config.distill_data))
