"""What a loaded model is calibrated and distilled on: the conditioning of the analysis and the data of the
distillation, wired from what the model brings.

* Conditioning (:func:`conditioning_source`): a zoo text-to-image model's own frozen text encoder on its prompts,
  a pipeline folder's tokenizer and text encoder, or nothing — the analysis then gives conditional UNets seeded
  random embeddings and unconditional ones none (:func:`ldpruner.passes.inputs.resolve_conditioning`).
* Prompts: a prompt file when given, else the model's own prompt set (zoo models), else the built-in one.
* Distillation data (:func:`distill_data`): the teacher's own sampling trajectories (data-free), or an image
  folder encoded through the model's VAE with its captions encoded like the prompts.
* The scheduler both sample with (:func:`sampling_scheduler`): the model's own, the one ``--scheduler`` names, or —
  for a model that brings none (a UNet folder, ``random:``, an in-memory UNet) — diffusers' ``DDIMScheduler()``,
  said in a notice and in the outputs. A pipeline folder without its ``scheduler/`` is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldpruner.base.errors import ConfigError, LdprunerError, ModelLoadError

if TYPE_CHECKING:  # the stages room loads no torch until a stage runs (the CLI's --help reads its configs)
    from ldpruner.sources import LoadedModel

__all__ = ["analysis_config", "check_distill_inputs", "conditioning_source", "distill_data", "note_default_scheduler",
           "prompts_for", "sampling_scheduler"]


def sampling_scheduler(loaded: LoadedModel) -> tuple[Any, str | None]:
    """(the scheduler the analysis and distillation sample with, where it came from): the model's own ("model"),
    the one ``--scheduler`` named ("asked"), a caller's (None: "given"), or (None, None) for a model that brings none
    — the passes then use ``DDIMScheduler()`` and record it as the default. A pipeline folder whose ``scheduler/``
    is missing is refused: the pipeline's own scheduler is the one its UNet was trained for."""
    if loaded.scheduler is None and loaded.missing_scheduler is not None:
        raise missing_scheduler_error(loaded.missing_scheduler.parent)
    return loaded.scheduler, loaded.scheduler_source


def missing_scheduler_error(pipeline_dir: Path) -> ModelLoadError:
    """The refusal of a pipeline folder without its scheduler (when no ``--scheduler`` names one)."""
    return ModelLoadError(
        f"pipeline folder {str(pipeline_dir)!r} has no scheduler/ (scheduler/scheduler_config.json), and the analysis "
        "and distillation sample with the pipeline's scheduler: restore scheduler/ as saved with the pipeline, or "
        "pass --scheduler NAME (scheduler=NAME: a diffusers scheduler class such as DDIMScheduler with its default "
        "config, or a scheduler folder)")


def note_default_scheduler(loaded: LoadedModel) -> None:
    """The one-line notice (once per loaded model) that a model without a scheduler samples with the default."""
    if loaded.scheduler is None and not loaded.default_scheduler_noted:
        loaded.default_scheduler_noted = True
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 says it for every rank
            return
        logging.getLogger("ldpruner.stages.calibration").warning(
            "note: %s brings no scheduler; the analysis and distillation sample with DDIMScheduler() at diffusers' "
            "defaults (which may differ from the schedule it was trained with): pass --scheduler NAME to choose one",
            loaded.source)


def prompts_for(loaded: LoadedModel, prompts_file: str | os.PathLike | None,
                limit: int | None = None) -> tuple[str, ...] | None:
    """The prompts a stage uses: the file's, else the model's own set (None: the built-in default). ``limit``: the
    number of samples that will use them (sample i uses prompt i mod P): prompts past it are never encoded."""
    from ldpruner.passes.conditioning import read_prompt_file

    prompts = read_prompt_file(prompts_file) if prompts_file else loaded.default_prompts
    return prompts[:limit] if prompts is not None and limit is not None else prompts


def analysis_config(loaded: LoadedModel, options: dict[str, Any], prompts_file: str | os.PathLike | None) -> Any:
    """The :class:`~ldpruner.passes.config.AnalysisConfig` of ``options`` with the prompts this model uses, once the
    text encoder that will encode them is known to load (a pickled one is refused here, before any trace)."""
    from ldpruner.passes.config import AnalysisConfig

    samples = options.get("num_samples", AnalysisConfig().num_samples)
    limit = samples if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0 else None
    config = AnalysisConfig.from_dict({**options, "prompts": prompts_for(loaded, prompts_file, limit)})
    _check_text_encoder(loaded)  # the analysis encodes the prompts after tracing: a refusal belongs before
    return config


def check_distill_inputs(loaded: LoadedModel, *, data: str | os.PathLike | None,
                         prompts_file: str | os.PathLike | None) -> None:
    """What :func:`distill_data` will read, checked from the files alone before the teacher is placed and traced:
    the prompt file, the pipeline's text encoder, and a dataset folder's images, captions and the model's VAE."""
    if prompts_file is not None:
        from ldpruner.passes.conditioning import read_prompt_file

        read_prompt_file(prompts_file)
    if data is None:
        _check_text_encoder(loaded)
        return
    from ldpruner.compiler.signature import signature
    from ldpruner.passes.distill.datasets import folder_captions, vae_folder
    from ldpruner.runtime.sampling import latent_channels

    sig = signature(loaded.unet)
    extra = sig.sample_channels - latent_channels(sig.sample_channels, sig.out_channels, loaded.scheduler)
    if extra:  # no folder can give what the UNet takes besides the latent: said before anything else
        raise _no_extra_channels(data, sig.sample_channels, extra)
    captions = folder_captions(Path(data))
    vae_folder(loaded.pipeline_dir, loaded.source)
    if _takes_text(loaded.unet):
        if captions is None:
            raise _no_captions(data, type(loaded.unet).__name__)
        if loaded.text_encoder_config is None:
            if loaded.pipeline_text_encoder is None:
                raise _no_text_encoder(loaded)
            from ldpruner.passes.conditioning import check_text_encoder

            check_text_encoder(loaded.pipeline_text_encoder)


def _no_extra_channels(data: str | os.PathLike, channels: int, extra: int) -> ConfigError:
    return ConfigError(f"distilling from an image folder (data={str(data)!r}) is not supported for "
                       f"in_channels={channels}: the UNet takes {extra} channels besides the latent (a mask, a "
                       "low-resolution image), which the folder does not give; distill data-free")


def _check_text_encoder(loaded: LoadedModel) -> None:
    """The pipeline folder's text encoder, when the conditioning will encode prompts with it (not for a zoo model,
    which brings its own, nor when the calibration file holds the embeddings), checked from its files."""
    if loaded.text_encoder_config is not None or loaded.pipeline_text_encoder is None:
        return
    if loaded.calibration is not None:
        from safetensors import safe_open

        with safe_open(str(loaded.calibration), framework="pt") as f:
            if "encoder_hidden_states" in f.keys():
                return
    from ldpruner.passes.conditioning import check_text_encoder

    check_text_encoder(loaded.pipeline_text_encoder)


def _takes_text(unet: Any) -> bool:
    """Whether ``unet`` reads text tokens (``encoder_hidden_states`` among the inputs its config gives it: not
    Kandinsky 2.2's image embeddings nor AudioLDM's class labels, though their forward has the argument)."""
    from ldpruner.compiler.signature import signature

    try:
        return "encoder_hidden_states" in signature(unet).names
    except LdprunerError:  # not a diffusers UNet: what its forward requires
        import inspect

        parameter = inspect.signature(unet.forward).parameters.get("encoder_hidden_states")
        return parameter is not None and parameter.default is inspect.Parameter.empty


def _no_captions(data: str | os.PathLike, model_class: str) -> ConfigError:
    return ConfigError(f"{str(data)!r} has no captions, and {model_class} is conditioned on text: add metadata.jsonl "
                       "({\"file_name\": ..., \"text\": ...} per line) or <image>.txt beside each image")


def _no_text_encoder(loaded: LoadedModel) -> ConfigError:
    return ConfigError(f"{loaded.source} has no text encoder to encode the dataset's captions with: pass a pipeline "
                       "folder with tokenizer/ and text_encoder/, or distill data-free (no data)")


def conditioning_source(loaded: LoadedModel, prompts: tuple[str, ...] | None) -> Any:
    """What conditions the analysis (the ``calib`` of ``analyze_importance``) and the teacher's trajectories: the zoo
    model's encoded ``prompts`` (None: the built-in set), the pipeline folder with a text encoder, or None; with the
    rows of the model's calibration file when it has one."""
    if loaded.text_encoder_config is not None:
        source = _zoo_conditioning(loaded, prompts)
    else:
        source = loaded.pipeline_text_encoder
    if loaded.calibration is None:
        return source
    from ldpruner.passes.conditioning import Conditioning, encode_prompts, read_calibration_file

    tensors = read_calibration_file(loaded.calibration)
    if isinstance(source, Path) and "encoder_hidden_states" not in tensors:
        from ldpruner.passes.conditioning import DEFAULT_PROMPTS

        source = encode_prompts(source, prompts or DEFAULT_PROMPTS)
    name = f"calibration file {loaded.calibration.name} ({', '.join(sorted(tensors))})"
    if isinstance(source, Conditioning):
        return source.replace(**tensors, source=f"{source.source}; {name}")
    return Conditioning(**tensors, source=name, partial=True)


def _zoo_conditioning(loaded: LoadedModel, prompts: tuple[str, ...] | None) -> Any:
    """A zoo text-to-image model's prompts, encoded by the frozen text encoder it was trained with."""
    from ldpruner.passes.conditioning import DEFAULT_PROMPTS, Conditioning
    from ldpruner.zoo.text import TextEncoder

    encoder = TextEncoder.from_config_file(loaded.text_encoder_config)
    prompts = tuple(prompts or DEFAULT_PROMPTS)
    return Conditioning(
        encoder_hidden_states=encoder.encode(list(prompts)),
        negative_encoder_hidden_states=encoder.encode_negative(1),
        source=f"{loaded.source}: {encoder.describe().get('package', 'text encoder')} on {len(prompts)} prompts",
        prompts=prompts,
    )


def distill_data(loaded: LoadedModel, teacher: Any, config: Any, *, data: str | os.PathLike | None,
                 prompts_file: str | os.PathLike | None, rank: int, world: int, progress: bool) -> Any:
    """What the student learns from: ``data`` None gives the teacher's trajectories (``config.trajectories`` seeded
    samplings, the model's prompts and guidance); a folder gives its images as VAE latents, with the captions
    encoded like the prompts (required for text-to-image models). Each rank gets its own shard."""
    from ldpruner.passes.distill.data import LatentData, TeacherTrajectories
    from ldpruner.passes.inputs import extra_channel_count, resolve_conditioning, scheduler_record

    given, _ = sampling_scheduler(loaded)
    note_default_scheduler(loaded)
    scheduler, _ = scheduler_record(given)
    sample = teacher.example_inputs[teacher.input_names[0]]
    prompts = prompts_for(loaded, prompts_file, config.trajectories)
    extra = extra_channel_count(teacher, scheduler)
    if data is not None and extra:
        raise _no_extra_channels(data, teacher.sample_channels, extra)
    if data is not None:
        import torch

        from ldpruner.passes.distill.datasets import encode_dataset

        # the VAE and the text encoder run where the teacher does
        device = next(teacher.gm.parameters()).device
        latents, captions = encode_dataset(loaded, Path(data), latent_size=tuple(sample.shape[-2:]),
                                           progress=progress and rank == 0, device=device)
        conditioning = cond_ids = None
        if "encoder_hidden_states" in teacher.input_names:
            if captions is None:
                raise _no_captions(data, teacher.model_class)
            unique = tuple(dict.fromkeys(captions))
            conditioning = _caption_conditioning(loaded, teacher, unique, seed=config.seed,
                                                 guidance_scale=config.guidance_scale)
            cond_ids = torch.tensor([unique.index(c) for c in captions], dtype=torch.int64)
        return LatentData(latents, scheduler, teacher.input_names, conditioning=conditioning, cond_ids=cond_ids,
                          source=str(data), rank=rank, world=world)
    conditioning = resolve_conditioning(teacher, conditioning_source(loaded, prompts), num_samples=config.trajectories,
                                        seed=config.seed, guidance_scale=config.guidance_scale, prompts=prompts,
                                        scheduler=scheduler)
    latent_shape = (teacher.sample_channels - extra, *sample.shape[2:])
    if extra and conditioning.extra_channels is None:
        conditioning = conditioning.replace(extra_channels=_extra_channels(teacher, scheduler, conditioning, config,
                                                                           latent_shape))
    return TeacherTrajectories(
        teacher.gm, teacher.input_names, scheduler, conditioning=conditioning,
        latent_shape=latent_shape, trajectories=config.trajectories, steps=config.trajectory_steps,
        guidance_scale=config.guidance_scale, seed=config.seed, renoise=config.renoise, rank=rank, world=world,
        # sampled under no_grad: one micro-batch of this rank's worth of trajectories at a time
        batch_size=max(1, config.batch_size // (world * config.gradient_accumulation)),
        progress=progress and rank == 0)


def _extra_channels(teacher: Any, scheduler: Any, conditioning: Any, config: Any,
                    latent_shape: tuple[int, ...]) -> Any:
    """The analysis's data-free extra channels (:func:`~ldpruner.passes.inputs.default_extra_channels`), one
    row per conditioning row, drawn with the teacher."""
    import torch

    from ldpruner.passes.conditioning import uses_guidance
    from ldpruner.passes.inputs import default_extra_channels
    from ldpruner.runtime.graph_unet import GraphUNet
    from ldpruner.runtime.sampling import sample_latents

    param = next(teacher.gm.parameters())
    rows = conditioning.rows_count
    noise = torch.randn((rows, *latent_shape), generator=torch.Generator().manual_seed(config.seed + 31)).to(
        param.device, param.dtype)
    guided = conditioning.has_negative and uses_guidance(teacher.input_names, config.guidance_scale)
    graph = GraphUNet(teacher.gm, teacher.input_names)

    def sample(noise: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        index = torch.arange(noise.shape[0])
        cond = conditioning.replace(extra_channels=extra).rows(index, param.device, param.dtype)
        with torch.no_grad():
            return sample_latents(graph.flat, scheduler, noise=noise, steps=config.trajectory_steps,
                                  guidance_scale=config.guidance_scale if guided else 1.0, seed=config.seed, **cond)

    return default_extra_channels(teacher, scheduler, noise=noise, sample=sample, seed=config.seed)


def _caption_conditioning(loaded: LoadedModel, teacher: Any, captions: tuple[str, ...], *, seed: int,
                          guidance_scale: float) -> Any:
    """The dataset's distinct captions, encoded like the prompts; inputs besides the text get seeded stand-ins."""
    from ldpruner.passes.conditioning import encode_prompts
    from ldpruner.passes.inputs import resolve_conditioning

    if loaded.text_encoder_config is not None:
        return _zoo_conditioning(loaded, captions)
    if loaded.pipeline_text_encoder is not None:
        encoded = encode_prompts(loaded.pipeline_text_encoder, captions, device=next(teacher.gm.parameters()).device)
        return resolve_conditioning(teacher, encoded, num_samples=len(captions), seed=seed,
                                    guidance_scale=guidance_scale)
    raise _no_text_encoder(loaded)
