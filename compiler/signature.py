"""What a diffusers UNet takes, read from its config: the flat inputs of its traced graph
(:mod:`ldpruner.base.unet_inputs`), their shapes and kinds, and seeded example inputs to trace it with.

Every config option that changes the inputs is handled here or refused here, with an
:class:`~ldpruner.base.errors.UnsupportedModelError` that names the option and its value:

* ``cross_attention_dim`` an int, or per level: one width at every cross-attention level gives one
  ``encoder_hidden_states``; with ``class_embed_type="simple_projection"`` and widths equal to each level's
  channels (AudioLDM) the blocks attend to their own features and the UNet takes no tokens;
* ``encoder_hid_dim`` / ``encoder_hid_dim_type`` (text_proj: DeepFloyd IF; text_image_proj: Kandinsky 2.1;
  image_proj: Kandinsky 2.2);
* ``addition_embed_type`` (text: IF; text_time: SDXL; text_image, image, image_hint: Kandinsky);
* ``class_embed_type`` / ``num_class_embeds`` (ids, timesteps, identity / projection / simple_projection
  embeddings);
* ``time_cond_proj_dim`` (LCM's ``timestep_cond``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldpruner.base.errors import TraceError, UnsupportedModelError
from ldpruner.base.unet_inputs import DOWN_RESIDUAL, FLAT_INPUTS, INTRA_RESIDUAL, MID_RESIDUAL

from .diffusers_call import call_diffusers_unet

__all__ = ["ClassLabels", "UNetSignature", "adapter_features", "controlnet_residuals", "signature",
           "unet_example_inputs", "unet_input_names"]

_CROSS_ATTENTION_BLOCKS = ("CrossAttn",)  # substring of every diffusers block type with cross-attention


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """What ``class_labels`` holds: ``"ids"`` (B,) ints below ``size``; ``"timesteps"`` (B,) ints embedded like the
    timestep (a noise level); ``"embedding"`` (B, ``size``) floats."""

    kind: str
    size: int | None


@dataclasses.dataclass(frozen=True)
class UNetSignature:
    """The inputs of one diffusers UNet, from its config."""

    model_class: str
    names: tuple[str, ...]  # flat input names, in FLAT_INPUTS order
    sample_channels: int  # channels of the ``sample`` input (the hint's channels are added inside the UNet)
    out_channels: int
    token_dim: int | None = None  # encoder_hidden_states (B, seq, token_dim)
    text_embeds_dim: int | None = None
    time_ids: bool = False
    image_embeds_dim: int | None = None
    hint_channels: int | None = None  # channels the hint adds to the sample inside the UNet
    class_labels: ClassLabels | None = None
    timestep_cond_dim: int | None = None


def _unsupported(option: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{option}={value!r} is not supported: {why}")


def _time_embed_dim(model: nn.Module) -> int:
    embedding = getattr(model, "time_embedding", None)
    linear = getattr(embedding, "linear_2", None)
    if isinstance(linear, nn.Linear):
        return linear.out_features
    return int(model.config.block_out_channels[0]) * 4


def _class_labels(model: nn.Module, cfg: Any) -> ClassLabels | None:
    kind = cfg.get("class_embed_type")
    num = cfg.get("num_class_embeds")
    if kind is None:
        return ClassLabels("ids", int(num)) if num is not None else None
    if kind == "timestep":
        return ClassLabels("timesteps", None)
    if kind == "identity":
        return ClassLabels("embedding", _time_embed_dim(model))
    if kind in ("projection", "simple_projection"):
        dim = cfg.get("projection_class_embeddings_input_dim")
        if dim is None:
            raise _unsupported("class_embed_type", kind, "the config sets no projection_class_embeddings_input_dim")
        return ClassLabels("embedding", int(dim))
    raise _unsupported("class_embed_type", kind, "ldpruner knows None, 'timestep', 'identity', 'projection' and "
                       "'simple_projection'")


def _token_dim(cfg: Any) -> int | None:
    """The width of encoder_hidden_states, None when the UNet takes no tokens."""
    hid_type = cfg.get("encoder_hid_dim_type")
    if hid_type == "image_proj":
        return None  # the image embedding is projected into the tokens
    if hid_type in ("text_proj", "text_image_proj"):
        return int(cfg["encoder_hid_dim"])
    if hid_type is not None:
        raise _unsupported("encoder_hid_dim_type", hid_type,
                           "ldpruner traces None, 'text_proj', 'text_image_proj' and 'image_proj' (IP-Adapter "
                           "projections are not part of the UNet it prunes)")
    cross = cfg.get("cross_attention_dim")
    if not isinstance(cross, (list, tuple)):
        return int(cross) if cross is not None else None
    # per level: only the levels with cross-attention read tokens (the mid block reads the last level's width)
    downs = list(cfg["down_block_types"])
    ups = list(cfg["up_block_types"])
    channels = list(cfg["block_out_channels"])
    reads: list[tuple[int, int]] = []  # (token width, block channels)
    for i, kind in enumerate(downs):
        if any(s in kind for s in _CROSS_ATTENTION_BLOCKS):
            reads.append((int(cross[i]), int(channels[i])))
    mid = cfg.get("mid_block_type") or ""
    if any(s in mid for s in _CROSS_ATTENTION_BLOCKS):
        reads.append((int(cross[-1]), int(channels[-1])))
    for i, kind in enumerate(ups):
        if any(s in kind for s in _CROSS_ATTENTION_BLOCKS):
            reads.append((int(list(reversed(cross))[i]), int(list(reversed(channels))[i])))
    widths = {w for w, _ in reads}
    if cfg.get("class_embed_type") == "simple_projection" and all(w == c for w, c in reads):
        return None  # AudioLDM: conditioned through class_labels; cross-attention attends to the block's own features
    if len(widths) == 1:
        return widths.pop()
    if not widths:
        return None
    raise _unsupported("cross_attention_dim", list(cross),
                       "its cross-attention levels read tokens of different widths, and a UNet2DConditionModel call "
                       "passes one encoder_hidden_states to all of them")


def signature(model: nn.Module) -> UNetSignature:
    """The inputs of a diffusers ``UNet2DConditionModel`` or ``UNet2DModel``, from its config; raises
    :class:`UnsupportedModelError` naming the option ldpruner cannot drive."""
    try:
        return _signature(model)
    except (UnsupportedModelError, TraceError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a config diffusers let through
        raise UnsupportedModelError(
            f"the inputs of this {type(model).__name__} cannot be read from its config ({type(exc).__name__}: "
            f"{exc}); it is not a configuration ldpruner supports") from exc


def _signature(model: nn.Module) -> UNetSignature:
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg = model.config
    name = type(model).__name__
    if isinstance(model, UNet2DConditionModel):
        fields: dict[str, Any] = {"token_dim": _token_dim(cfg)}
        added = cfg.get("addition_embed_type")
        hint_channels = None
        if added == "text_time":
            fields["text_embeds_dim"] = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(
                cfg["addition_time_embed_dim"])
            fields["time_ids"] = True
        elif added == "text_image":
            fields["text_embeds_dim"] = int(cfg["cross_attention_dim"])
            fields["image_embeds_dim"] = int(cfg["cross_attention_dim"])
        elif added in ("image", "image_hint"):
            fields["image_embeds_dim"] = int(cfg["encoder_hid_dim"])
            if added == "image_hint":
                block = getattr(getattr(model, "add_embedding", None), "input_hint_block", None)
                hint_channels = int(block[-1].out_channels) if isinstance(block, nn.Sequential) else 4
        elif added not in (None, "text"):
            raise _unsupported("addition_embed_type", added,
                               "ldpruner knows None, 'text', 'text_time', 'text_image', 'image' and 'image_hint'")
        if cfg.get("encoder_hid_dim_type") == "text_image_proj":
            fields["image_embeds_dim"] = int(cfg["cross_attention_dim"])
        elif cfg.get("encoder_hid_dim_type") == "image_proj":
            fields["image_embeds_dim"] = int(cfg["encoder_hid_dim"])
        if added == "text" and fields["token_dim"] is None:
            raise _unsupported("addition_embed_type", added, "it embeds encoder_hidden_states, which this UNet "
                               "does not take")
        fields["class_labels"] = _class_labels(model, cfg)
        if cfg.get("time_cond_proj_dim") is not None:
            fields["timestep_cond_dim"] = int(cfg["time_cond_proj_dim"])
        fields["hint_channels"] = hint_channels
        sample_channels = int(cfg["in_channels"]) - (hint_channels or 0)
    elif isinstance(model, UNet2DModel):
        fields = {"class_labels": _class_labels(model, cfg)}
        sample_channels = int(cfg["in_channels"])
    else:
        raise TraceError(f"{name} is not a diffusers UNet2DModel / UNet2DConditionModel")
    present = {
        "sample": True,
        "timestep": True,
        "encoder_hidden_states": fields.get("token_dim") is not None,
        "text_embeds": fields.get("text_embeds_dim") is not None,
        "time_ids": bool(fields.get("time_ids")),
        "image_embeds": fields.get("image_embeds_dim") is not None,
        "hint": fields.get("hint_channels") is not None,
        "class_labels": fields.get("class_labels") is not None,
        "timestep_cond": fields.get("timestep_cond_dim") is not None,
    }
    return UNetSignature(model_class=name, names=tuple(n for n in FLAT_INPUTS if present[n]),
                         sample_channels=sample_channels, out_channels=int(cfg["out_channels"]), **fields)


def unet_input_names(model: nn.Module) -> tuple[str, ...]:
    """The tensor inputs a diffusers UNet needs, in call order."""
    return signature(model).names


def unet_example_inputs(
    model: nn.Module,
    *,
    batch: int = 2,
    height: int | None = None,
    width: int | None = None,
    seq_len: int = 77,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Seeded example inputs for a diffusers UNet, from its config (sizes default to ``config.sample_size``)."""
    sig = signature(model)
    cfg = model.config
    size = cfg.sample_size if cfg.sample_size is not None else 64
    size = (size, size) if isinstance(size, int) else tuple(size)
    height = height or size[0]
    width = width or size[1]
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def ints(high: int) -> torch.Tensor:
        return torch.randint(0, high, (batch,), generator=gen).to(device=device)

    makers: Mapping[str, Any] = {
        "sample": lambda: randn(batch, sig.sample_channels, height, width),
        "timestep": lambda: torch.full((batch,), 500, dtype=torch.long, device=device),
        "encoder_hidden_states": lambda: randn(batch, seq_len, sig.token_dim),
        "text_embeds": lambda: randn(batch, sig.text_embeds_dim),
        "time_ids": lambda: torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch,
                                         dtype=dtype, device=device),
        "image_embeds": lambda: randn(batch, sig.image_embeds_dim),
        "hint": lambda: randn(batch, 3, height * 8, width * 8),
        "class_labels": lambda: (randn(batch, sig.class_labels.size) if sig.class_labels.kind == "embedding"
                                 else ints(sig.class_labels.size or 1000)),
        "timestep_cond": lambda: randn(batch, sig.timestep_cond_dim),
    }
    return {name: makers[name]() for name in sig.names}


def _shapes_from_a_run(model: nn.Module, inputs: Mapping[str, torch.Tensor], option: str,
                       hooks: Sequence[tuple[nn.Module, Any]]) -> None:
    """Run ``model`` on ``inputs`` with forward ``hooks`` ((module, hook) pairs) that record shapes; ``option`` names
    the feature for the error a UNet2DModel gets."""
    from diffusers import UNet2DConditionModel

    if not isinstance(model, UNet2DConditionModel):
        raise UnsupportedModelError(f"{option}=True is not supported for a {type(model).__name__}: its residuals are "
                                    "inputs of UNet2DConditionModel only")
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        call_diffusers_unet(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def _random_inputs(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(param.device, param.dtype) for name, shape in shapes.items()}


def controlnet_residuals(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example ControlNet residuals for ``model`` at ``inputs``: one tensor per skip tensor of the down path (the
    conv_in output and every down block's res samples, diffusers' ``down_block_additional_residuals``) and one for
    the mid block's output, shaped by a run of the model (their shapes depend on the block types)."""
    from diffusers import UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel) and model.mid_block is None:
        raise UnsupportedModelError("controlnet=True is not supported with mid_block_type=None: ControlNet adds a "
                                    "residual to the mid block's output")
    if not isinstance(model, UNet2DConditionModel):
        _shapes_from_a_run(model, inputs, "controlnet", [])  # refuses it, naming the class
    skips: list[tuple[int, ...]] = []
    mid: list[tuple[int, ...]] = []
    hooks: list[tuple[nn.Module, Any]] = [(model.conv_in, lambda m, a, out: skips.append(tuple(out.shape)))]
    hooks += [(block, lambda m, a, out: skips.extend(tuple(t.shape) for t in out[1])) for block in model.down_blocks]
    hooks.append((model.mid_block, lambda m, a, out: mid.append(tuple(out.shape))))
    _shapes_from_a_run(model, inputs, "controlnet", hooks)
    shapes = {f"{DOWN_RESIDUAL}{i}": shape for i, shape in enumerate(skips)}
    return _random_inputs(model, {**shapes, MID_RESIDUAL: mid[0]}, seed=11)


def adapter_features(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example T2I-Adapter features for ``model`` at ``inputs``: one per down block, shaped like what diffusers adds
    it to (a cross-attention block's last layer output, before its downsampler; a plain block's output), and one
    for the mid block's input (SDXL's adapters give one more feature, which diffusers adds there; adapters that give
    none leave it zero)."""
    shapes: list[tuple[int, ...]] = []

    def record(block: nn.Module, _args: Any, out: Any) -> None:
        if getattr(block, "has_cross_attention", False):
            shapes.append(tuple(out[1][len(block.resnets) - 1].shape))
        else:
            shapes.append(tuple(out[0].shape))

    hooks: list[tuple[nn.Module, Any]] = [(block, record) for block in getattr(model, "down_blocks", [])]
    _shapes_from_a_run(model, inputs, "adapter", hooks)
    if getattr(model, "mid_block", None) is not None:
        shapes.append(shapes[-1])  # the mid block takes the last down block's output
    return _random_inputs(model, {f"{INTRA_RESIDUAL}{i}": shape for i, shape in enumerate(shapes)}, seed=13)
