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
* ``timestep_cond`` (B, D): LCM's guidance-scale embedding (``time_cond_proj_dim``);
* ``down_block_additional_residual_<i>`` and ``mid_block_additional_residual``: ControlNet's residuals, in graphs
  traced with them (``controlnet=True``); ``down_intrablock_additional_residual_<i>``: T2I-Adapter's features
  (``adapter=True``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ldpruner.base.errors import UnsupportedInputError

__all__ = ["ADDED_COND_KEYS", "DOWN_RESIDUAL", "FLAT_INPUTS", "GUIDED_INPUTS", "INTRA_RESIDUAL", "MID_RESIDUAL",
           "TEXT_AXIS", "TEXT_INPUT", "adapter_inputs", "diffusers_kwargs", "flat_inputs", "no_drop_in",
           "residual_inputs", "residual_names"]

FLAT_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "image_embeds", "hint",
               "class_labels", "timestep_cond")
# ControlNet residuals, when a graph is traced with them: one input per skip tensor of the down path (what diffusers
# takes as down_block_additional_residuals), then the mid block's
DOWN_RESIDUAL = "down_block_additional_residual_"
MID_RESIDUAL = "mid_block_additional_residual"
# T2I-Adapter's features, when a graph is traced with them: one per down block (down_intrablock_additional_residuals)
INTRA_RESIDUAL = "down_intrablock_additional_residual_"
# passed to a diffusers UNet inside added_cond_kwargs
ADDED_COND_KEYS = ("text_embeds", "time_ids", "image_embeds", "hint")
# inputs with an unconditional counterpart: classifier-free guidance runs the UNet on the negative row
GUIDED_INPUTS = ("encoder_hidden_states", "text_embeds", "image_embeds")
# the tokens cross-attention reads come in any number (CLIP's 77, the zoo encoder's 16, long prompts): a traced graph
# and its ONNX export keep that axis free, under the name optimum gives it in Stable Diffusion UNet exports
TEXT_INPUT = "encoder_hidden_states"
TEXT_AXIS = "sequence_length"


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
    down = residual_names(list(flat))
    if down:
        kwargs["down_block_additional_residuals"] = tuple(flat[k] for k in down)
        kwargs["mid_block_additional_residual"] = flat.get(MID_RESIDUAL)
    intra = residual_names(list(flat), INTRA_RESIDUAL)
    if intra:  # a fresh list per call: diffusers pops from it
        kwargs["down_intrablock_additional_residuals"] = [flat[k] for k in intra]
    return kwargs


def residual_names(names: Sequence[str], prefix: str = DOWN_RESIDUAL) -> list[str]:
    """The input names among ``names`` that start with ``prefix`` (ControlNet's down residuals by default,
    T2I-Adapter's with INTRA_RESIDUAL), in order (0, 1, … 10, 11)."""
    return sorted((n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()),
                  key=lambda n: int(n[len(prefix):]))


def adapter_inputs(features: Sequence[Any] | None, taken: Sequence[str], caller: str) -> dict[str, Any]:
    """The flat inputs of diffusers' ``down_intrablock_additional_residuals`` (T2I-Adapter) for a graph whose inputs
    are ``taken``; an error that says how to get such a graph when it has none."""
    if features is None:
        return {}
    names = residual_names(taken, INTRA_RESIDUAL)
    if not names:
        raise UnsupportedInputError(f"{caller}: down_intrablock_additional_residuals (T2I-Adapter features) given, "
                                    "but this graph was not traced with them; load or export the student with "
                                    "adapter=True (CLI: --adapter)")
    if len(features) not in (len(names), len(names) - 1):
        raise UnsupportedInputError(f"{caller}: {len(features)} down_intrablock_additional_residuals given; the "
                                    f"UNet takes one per down block ({len(names) - 1}) and one more for its mid "
                                    f"block (SDXL's adapters): {len(names) - 1} or {len(names)}")
    return dict(zip(names, features))  # without the mid block's feature, it is zero


def residual_inputs(down: Sequence[Any] | None, mid: Any, taken: Sequence[str], caller: str) -> dict[str, Any]:
    """The flat inputs of diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` for a
    graph whose inputs are ``taken``; an error that says how to get such a graph when it has none."""
    if down is None and mid is None:
        return {}
    names = residual_names(taken)
    if not names:
        given = [n for n, v in (("down_block_additional_residuals", down), ("mid_block_additional_residual", mid))
                 if v is not None]
        raise UnsupportedInputError(f"{caller}: {' and '.join(given)} (ControlNet residuals) given, but this graph "
                                    "was not traced with them; load or export the student with controlnet=True "
                                    "(CLI: --controlnet)")
    if down is None or mid is None:
        raise UnsupportedInputError(f"{caller}: ControlNet residuals come as a pair: down_block_additional_residuals "
                                    "and mid_block_additional_residual")
    if len(down) != len(names):
        raise UnsupportedInputError(f"{caller}: {len(down)} down_block_additional_residuals given; the UNet has "
                                    f"{len(names)} skip tensors")
    return {**dict(zip(names, down)), MID_RESIDUAL: mid}


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


# UNet configs whose stock diffusers pipelines give the UNet what a traced graph has no input for, on every call: no
# drop-in can take their place. (option, its values, what the pipelines pass)
_NO_DROP_IN = (
    ("attention_type", ("gated", "gated-text-image"),
     "StableDiffusionGLIGENPipeline (and its text-image variant) passes its grounding to the UNet's gated fusers "
     "(cross_attention_kwargs['gligen']), which the pruned graph and its ONNX model do not have"),
    ("class_embed_type", ("identity",),
     "UnCLIPPipeline and UnCLIPImageVariationPipeline pass the decoder the prompt's padding mask as attention_mask, "
     "for which the pruned graph and its ONNX model have no input"),
)


def no_drop_in(config: Mapping[str, Any] | None) -> str | None:
    """Why no drop-in (``ORTUNet``, ``StudentUNet``) can take the place of a UNet with this diffusers ``config`` in
    its stock pipelines, in one line naming the option; None when they can."""
    for option, values, why in _NO_DROP_IN:
        value = (config or {}).get(option)
        if value in values:
            return (f"{option}={value!r} is not supported by export: {why}, so no drop-in can take this UNet's place "
                    "(analyze, prune and distill work)")
    return None
