"""The flat tensor inputs of a traced UNet graph, and how they map to and from a diffusers UNet call.

A traced (or pruned, or exported) UNet takes its inputs as flat tensors by name, in the order of
:data:`FLAT_INPUTS` (only those its config needs). A diffusers UNet takes some of them inside
``added_cond_kwargs``; :func:`diffusers_kwargs` and :func:`flat_inputs` translate between the two forms, so the
tracer, the graph wrappers (``GraphUNet``, ``ORTUNet``) and the sampling loop agree on one vocabulary.

* ``sample`` (B, C[+E], H, W): the noisy latent, with any extra conditioning channels the UNet concatenates in
  front of its first convolution (inpainting's mask and masked-image latents, an upscaler's low-resolution image);
* ``timestep`` (B,);
* ``encoder_hidden_states`` (B, seq, D): the text (or other) tokens cross-attention reads;
* ``text_embeds`` (B, D), ``time_ids`` (B, 6): SDXL's pooled text and size/crop ids; Kandinsky 2.1's pooled text;
* ``image_embeds`` (B, D): Kandinsky's image embeddings; ``hint`` (B, 3, 8H, 8W): Kandinsky 2.2 ControlNet's
  control image;
* ``class_labels`` (B,) ids or (B, D) embeddings, per the UNet's ``class_embed_type``;
* ``timestep_cond`` (B, D): LCM's guidance-scale embedding (``time_cond_proj_dim``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import UnsupportedInputError

__all__ = ["ADDED_COND_KEYS", "FLAT_INPUTS", "GUIDED_INPUTS", "diffusers_kwargs", "flat_inputs"]

FLAT_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "image_embeds", "hint",
               "class_labels", "timestep_cond")
# passed to a diffusers UNet inside added_cond_kwargs
ADDED_COND_KEYS = ("text_embeds", "time_ids", "image_embeds", "hint")
# inputs with an unconditional counterpart: classifier-free guidance runs the UNet on the negative row
GUIDED_INPUTS = ("encoder_hidden_states", "text_embeds", "image_embeds")


def diffusers_kwargs(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a diffusers UNet ``forward`` (besides sample and timestep) for flat inputs;
    ``encoder_hidden_states`` is always present (None when the UNet takes no tokens)."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": flat.get("encoder_hidden_states")}
    for name in ("class_labels", "timestep_cond"):
        if flat.get(name) is not None:
            kwargs[name] = flat[name]
    added = {k: flat[k] for k in ADDED_COND_KEYS if flat.get(k) is not None}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def flat_inputs(*, encoder_hidden_states: Any = None, class_labels: Any = None, timestep_cond: Any = None,
                added_cond_kwargs: Mapping[str, Any] | None = None, caller: str) -> dict[str, Any]:
    """The flat conditioning inputs of a diffusers-style UNet call (None where not given). ``caller`` names the
    wrapper in the error an unknown ``added_cond_kwargs`` key raises."""
    added = dict(added_cond_kwargs or {})
    unknown = sorted(set(added) - set(ADDED_COND_KEYS))
    if unknown:
        raise UnsupportedInputError(f"{caller}: added_cond_kwargs {unknown} are not inputs of a traced UNet graph; "
                                    f"it takes {list(ADDED_COND_KEYS)}")
    out = {"encoder_hidden_states": encoder_hidden_states, "class_labels": class_labels,
           "timestep_cond": timestep_cond}
    out.update({k: added.get(k) for k in ADDED_COND_KEYS})
    return out
