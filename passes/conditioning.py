"""Where the conditioning of the analysis and the distillation comes from: precomputed embeddings, a calibration
file, a local text encoder on prompts (a prompt file or the built-in set), or seeded random embeddings when only
the UNet is available; and whether a UNet's sampling runs classifier-free guidance.

A :class:`Conditioning` holds P rows; sample i of the analysis uses row ``i % P``. Fitting it to one traced UNet
(checks, seeded stand-ins for the inputs it lacks, extra channels) is :mod:`ldpruner.passes.inputs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.base.fingerprint import update_with_tensor
from ldpruner.base.unet_inputs import GUIDED_INPUTS

__all__ = [
    "Conditioning",
    "DEFAULT_PROMPTS",
    "RANDOM_EMBEDDINGS",
    "random_conditioning",
    "check_text_encoder",
    "encode_prompts",
    "read_calibration_file",
    "read_prompt_file",
    "uses_guidance",
]

RANDOM_EMBEDDINGS = "random-embeddings"
# tensors whose one row is shared by every sample (the loop broadcasts it) rather than indexed per sample
_SHARED_PREFIXES = ("negative_", "time_ids", "timestep_cond")
RANDOM_SEQ_LEN = 77  # CLIP's context length: what SD-family UNets see in training

# Varied subjects, styles and layouts, so the calibration set exercises more than one kind of image.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up photo of a red fox in the snow",
    "an isometric pixel-art city with neon signs",
    "a bowl of ramen on a wooden table, studio lighting",
    "a pencil sketch of an old man reading a newspaper",
    "a futuristic car parked in a desert, cinematic",
    "a cozy living room with a fireplace and bookshelves",
    "a macro photograph of a dew drop on a leaf",
    "an oil painting of a stormy sea with a sailing ship",
    "a cartoon cat wearing sunglasses",
    "aerial view of a river winding through a green valley",
    "a still life of apples and a jug, impressionist style",
    "a portrait of a woman with curly hair, soft light",
    "a handwritten digit seven",
    "a smiling emoji face",
)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Conditioning rows for the UNet. Sample i uses row ``i % P`` of every per-prompt tensor.

    * ``encoder_hidden_states`` (P, seq, dim): the prompt embeddings.
    * ``negative_encoder_hidden_states`` (1 or P, seq, dim): the unconditional embeddings classifier-free
      guidance needs (diffusers: the encoding of the empty prompt). None disables guidance.
    * ``text_embeds`` / ``negative_text_embeds`` (P or 1, D) and ``time_ids`` (1 or P, 6): SDXL's added
      conditioning (pooled text embedding, size/crop ids); Kandinsky 2.1's pooled text.
    * ``image_embeds`` / ``negative_image_embeds`` (P or 1, D): Kandinsky's image embeddings (2.2 conditions on
      them alone).
    * ``hint`` (P, 3, 8H, 8W): Kandinsky 2.2 ControlNet's control image.
    * ``class_labels`` (P,) ids or (P, D) embeddings: for class-conditional UNets (what kind the UNet's
      ``class_embed_type`` says).
    * ``timestep_cond`` (1 or P, D): LCM's guidance-scale embedding (``time_cond_proj_dim``).
    * ``extra_channels`` (P, E, H, W): channels the pipeline concatenates to the latent before every UNet call
      (inpainting: the mask and the masked-image latents; an upscaler: the low-resolution image).
    * ``source``: where the rows came from; the report records it.

    Inputs a Conditioning lacks that the UNet takes get the analysis' seeded defaults (class labels, hints, LCM's
    embedding …), except the guided ones (text and image embeddings: a missing one is an error) unless ``partial``.
    """

    encoder_hidden_states: torch.Tensor | None = None
    negative_encoder_hidden_states: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    negative_text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    negative_image_embeds: torch.Tensor | None = None
    hint: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None
    extra_channels: torch.Tensor | None = None
    source: str = "precomputed"
    prompts: tuple[str, ...] | None = None
    # True: built from a partial source (a calibration file without embeddings); the inputs it lacks, text and image
    # embeddings included, take the analysis' defaults. False: only inputs other than those may be filled in.
    partial: bool = False

    def __post_init__(self) -> None:
        errors = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("source", "prompts", "partial") or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                errors.append(f"{f.name} must be a tensor or None, got {type(value).__name__}")
            elif value.ndim == 0 or value.shape[0] == 0:
                errors.append(f"{f.name} must have at least one row, got shape {tuple(value.shape)}")
        for name, ndim in (("encoder_hidden_states", 3), ("hint", 4), ("extra_channels", 4)):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.ndim != ndim:
                errors.append(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
        for name in GUIDED_INPUTS:
            pos, neg = getattr(self, name), getattr(self, f"negative_{name}")
            if isinstance(neg, torch.Tensor) and pos is None:
                errors.append(f"negative_{name} needs {name}")
            elif isinstance(neg, torch.Tensor) and isinstance(pos, torch.Tensor) and neg.shape[1:] != pos.shape[1:]:
                errors.append(f"negative_{name} shape {tuple(neg.shape)} does not match {name} "
                              f"{tuple(pos.shape)} past the first dimension")
        if self.time_ids is not None and self.text_embeds is None:
            errors.append("time_ids (SDXL) need text_embeds")
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if errors:
            raise ConfigError("invalid Conditioning: " + "; ".join(errors))

    @property
    def has_negative(self) -> bool:
        """Every guided input given has its negative: classifier-free guidance can run."""
        given = [n for n in GUIDED_INPUTS if getattr(self, n) is not None]
        return bool(given) and all(getattr(self, f"negative_{n}") is not None for n in given)

    @property
    def rows_count(self) -> int:
        """P: the number of distinct conditions (1 for an unconditional model)."""
        for name in ("encoder_hidden_states", "image_embeds", "class_labels", "text_embeds", "extra_channels",
                     "hint"):
            value = getattr(self, name)
            if value is not None:
                return int(value.shape[0])
        return 1

    def replace(self, **changes: Any) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def rows(self, indices: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The conditioning of samples ``indices`` as keyword arguments of the sampling loop.

        Per-prompt tensors are indexed ``i % P``; one-row tensors stay one row (the loop broadcasts them)."""
        out: dict[str, torch.Tensor] = {}
        for name, value in self.tensors().items():
            rows = value if value.shape[0] == 1 and name.startswith(_SHARED_PREFIXES) else \
                value[indices % value.shape[0]]
            if rows.is_floating_point():
                rows = rows.to(dtype=dtype)
            out[name] = rows.to(device=device)
        return out

    def fingerprint(self) -> str:
        """sha256 of the tensors (names, dtypes, shapes, bytes) and the source: part of the analysis cache key."""
        h = hashlib.sha256(f"source={self.source};prompts={self.prompts!r}".encode())
        for name, value in sorted(self.tensors().items()):
            update_with_tensor(h, name, value)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "prompts": list(self.prompts) if self.prompts is not None else None,
            "rows": {name: list(value.shape) for name, value in self.tensors().items()},
        }


def random_conditioning(*, num_rows: int, seed: int, cross_attention_dim: int, seq_len: int = RANDOM_SEQ_LEN,
                        pooled_dim: int | None = None, image_size: tuple[int, int] | None = None,
                        num_classes: int | None = None) -> Conditioning:
    """Seeded Gaussian embeddings standing in for a text encoder when only the UNet is available.

    ``num_rows`` prompt embeddings of shape (``seq_len``, ``cross_attention_dim``) and one shared negative
    embedding (the stand-in for the empty prompt), all N(0, 1) from a CPU generator seeded with ``seed``.
    SDXL UNets (``pooled_dim`` set) also get random pooled embeddings and the size ids of an ``image_size``
    (height, width) image; class-conditional ones (``num_classes`` set) get random labels. Scores computed on
    these measure how much each operator matters for cross-attention inputs of the right shape and scale, not
    for real prompts; the report labels them ``conditioning: "random-embeddings"``.
    """
    gen = torch.Generator().manual_seed(seed)
    negative = torch.randn(1, seq_len, cross_attention_dim, generator=gen)
    positive = torch.randn(num_rows, seq_len, cross_attention_dim, generator=gen)
    extra: dict[str, torch.Tensor] = {}
    if pooled_dim is not None:
        if image_size is None:
            raise ConfigError("random SDXL conditioning needs image_size=(height, width) for its time_ids")
        extra["negative_text_embeds"] = torch.randn(1, pooled_dim, generator=gen)
        extra["text_embeds"] = torch.randn(num_rows, pooled_dim, generator=gen)
        h, w = image_size
        extra["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
    if num_classes is not None:
        extra["class_labels"] = torch.randint(0, num_classes, (num_rows,), generator=gen)
    return Conditioning(encoder_hidden_states=positive, negative_encoder_hidden_states=negative,
                        source=RANDOM_EMBEDDINGS, **extra)


CALIBRATION_KEYS = ("encoder_hidden_states", "negative_encoder_hidden_states", "text_embeds", "negative_text_embeds",
                    "time_ids", "image_embeds", "negative_image_embeds", "hint", "class_labels", "timestep_cond",
                    "extra_channels")


def read_calibration_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Calibration inputs from a safetensors file: tensors named like :class:`Conditioning`'s fields (rows first;
    sample i of the analysis uses row ``i % rows``), for example ``extra_channels`` (N, 5, H, W) holding an
    inpainting UNet's real masks and masked-image latents, or ``class_labels``. Inputs the file lacks get the
    analysis' defaults."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"calibration file {str(path)!r} is not a readable safetensors file: {exc}") from exc
    unknown = sorted(set(tensors) - set(CALIBRATION_KEYS))
    if unknown or not tensors:
        raise ConfigError(f"calibration file {str(path)!r} holds {sorted(tensors)}; its tensors must be named from "
                          f"{list(CALIBRATION_KEYS)}" + (f" (unknown: {unknown})" if unknown else ""))
    return tensors


def uses_guidance(input_names: Sequence[str], guidance_scale: float) -> bool:
    """Whether sampling a UNet with these inputs runs classifier-free guidance at ``guidance_scale``: it takes a
    guided input (tokens, pooled text, an image embedding) and the scale is above 1 — except for LCM UNets
    (``timestep_cond``), whose pipelines embed the scale instead of guiding."""
    return guidance_scale > 1 and "timestep_cond" not in input_names and any(
        n in input_names for n in GUIDED_INPUTS)


def read_prompt_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompts, one per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                          "as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"prompt file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    prompts = tuple(line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ConfigError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_text_encoder(pipeline_dir: str | os.PathLike) -> None:
    """What :func:`encode_prompts` needs of a pipeline folder, checked from its files alone (nothing is loaded, so a
    stage checks it before its first UNet call): tokenizer/ and one text_encoder/ whose weights are safetensors
    (ldpruner never loads pickles)."""
    folder = Path(pipeline_dir)
    for sub in ("tokenizer", "text_encoder"):
        if not (folder / sub).is_dir():
            raise ModelLoadError(f"{str(folder)!r} has no {sub}/ folder: it is not a text-to-image pipeline folder")
    if (folder / "text_encoder_2").is_dir():
        raise ModelLoadError(
            f"{str(folder)!r} has two text encoders (SDXL); encode the prompts yourself and pass a Conditioning "
            "with encoder_hidden_states, text_embeds and time_ids")
    encoder = folder / "text_encoder"
    if not any(encoder.glob("*.safetensors")):
        pickles = sorted(p.name for p in encoder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(f"the text encoder of {str(folder)!r} is pickled (text_encoder/ holds {pickles}, "
                                 "no .safetensors): convert it to safetensors; ldpruner never loads pickles")
        raise ModelLoadError(f"the text encoder of {str(folder)!r} has no weights (no .safetensors in "
                             "text_encoder/): save its weights there as safetensors")


def encode_prompts(pipeline_dir: str | os.PathLike, prompts: Sequence[str] = DEFAULT_PROMPTS, *,
                   max_length: int | None = None, device: Any = None, batch_size: int = 64) -> Conditioning:
    """Encode ``prompts`` and the empty prompt with the tokenizer/ and text_encoder/ of a local diffusers
    pipeline folder (transformers, ``local_files_only=True``), the way StableDiffusionPipeline does:
    padded to ``max_length`` (default: the tokenizer's ``model_max_length``), last hidden state, attention mask
    only when the encoder's config sets ``use_attention_mask``. The encoder runs on ``device`` (None: the CPU),
    ``batch_size`` prompts at a time; the embeddings come back as float32 CPU tensors.

    Pipelines with a second text encoder (SDXL) are not handled here: pass a precomputed Conditioning."""
    folder = Path(pipeline_dir)
    prompts = tuple(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompts must be a non-empty sequence of strings, got {prompts!r}")
    check_text_encoder(folder)
    try:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = AutoModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                            use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the text encoder of {str(folder)!r}: {exc}") from exc
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length > 100_000:  # transformers' sentinel for "no limit configured"
            raise ConfigError(
                f"the tokenizer in {str(folder / 'tokenizer')!r} sets no model_max_length; pass max_length")
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    if device is not None:
        encoder.to(device)
    where = next(encoder.parameters()).device

    def encode(texts: Sequence[str]) -> torch.Tensor:
        states = []
        for begin in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[begin:begin + batch_size]), padding="max_length", max_length=max_length,
                               truncation=True, return_tensors="pt").to(where)
            with torch.no_grad():
                out = encoder(input_ids=tokens["input_ids"],
                              attention_mask=tokens["attention_mask"] if use_mask else None)
            states.append(out.last_hidden_state.float().cpu())
        return torch.cat(states)

    return Conditioning(encoder_hidden_states=encode(prompts), negative_encoder_hidden_states=encode([""]),
                        source="text-encoder", prompts=prompts)
