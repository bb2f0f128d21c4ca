"""Every precondition of a bench run that its files and this machine decide, checked before the first model is
analysed: the quality of a zoo model needs packages and Debian data (espeak-ng, crawl-tiles-data) that a minimal
install lacks, a pipeline folder's text encoder must be safetensors, a distillation dataset folder must hold images.
Without this a missing program would be found after the analysis, the exports and the dense samples."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldpruner.base.errors import BenchError
from ldpruner.stages.config import BenchConfig

__all__ = ["check_bench_inputs"]


def check_bench_inputs(config: BenchConfig, objects: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Raise the first refusal a bench run of ``config`` would meet before any model is loaded (``objects``: the
    models given in memory, which need no check). Returns the build folders among the models, read and verified
    (:func:`ldpruner.stages.build.read_build_folder`), by the name they were given under."""
    from ldpruner.stages.build import is_build_folder, read_build_folder

    builds = {}
    for spec in config.models:
        if objects and spec in objects:
            continue
        scheduler = config.inputs.scheduler
        if is_build_folder(spec):  # a finished build, unchanged; its model is checked as the build loaded it
            builds[spec] = read_build_folder(spec)
            spec, scheduler = builds[spec].config.model, builds[spec].config.inputs.scheduler
        _check_model(spec, config, scheduler)
    if config.inputs.prompts is not None or config.inputs.calibration is not None:
        from ldpruner.passes.conditioning import read_calibration_file, read_prompt_file

        if config.inputs.prompts is not None:
            read_prompt_file(config.inputs.prompts)
        if config.inputs.calibration is not None:
            read_calibration_file(config.inputs.calibration)
    if config.distill_data is not None and config.distill.steps:
        from ldpruner.passes.distill.datasets import folder_captions

        folder_captions(Path(config.distill_data))
    return builds


def _check_model(spec: str, config: BenchConfig, scheduler: str | None) -> None:
    """What the files of one MODEL decide: the quality reference's needs, a pipeline folder's scheduler and text
    encoder, and whether its pruned UNet can be exported for a pipeline at all."""
    from ldpruner.passes.conditioning import check_text_encoder
    from ldpruner.sources import RANDOM_PREFIX, ZOO_PREFIX
    from ldpruner.stages import check_exportable
    from ldpruner.stages.calibration import missing_scheduler_error

    from .quality import QUALITY_MODELS, missing_requirements, sample_count_problem

    name = spec.removeprefix(ZOO_PREFIX)
    if config.quality and spec.startswith(ZOO_PREFIX) and name in QUALITY_MODELS:
        missing = missing_requirements(name)
        if missing:
            raise BenchError(f"quality of {spec} needs what this machine lacks: {' and '.join(missing)}; "
                             f"install {'them' if len(missing) > 1 else 'it'}, or pass --no-quality "
                             "(quality=False)")
        problem = sample_count_problem(name, config.samples)
        if problem:
            raise BenchError(f"quality of {spec}: {problem}")
    if spec.startswith(RANDOM_PREFIX):
        from ldpruner.sources import families

        if spec[len(RANDOM_PREFIX):] in families.FAMILIES:
            check_exportable(families.family_config(spec[len(RANDOM_PREFIX):]))
        return
    folder = Path(spec)
    if spec.startswith(ZOO_PREFIX) or not folder.is_dir():
        return  # a zoo model, or what loading the model will refuse by name
    pipeline = (folder / "model_index.json").is_file()
    unet_config = folder / "unet" / "config.json" if pipeline else folder / "config.json"
    if unet_config.is_file():
        from ldpruner.base.io import read_json

        check_exportable(read_json(unet_config, what="UNet config"))
    if pipeline and scheduler is None and not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise missing_scheduler_error(folder)
    if pipeline and (folder / "text_encoder").is_dir():
        check_text_encoder(folder)
