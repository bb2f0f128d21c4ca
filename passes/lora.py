"""LoRA for a pruned student: a LoRA trained for the dense UNet, fused into the student's weights.

The LoRA file is read the way diffusers reads one (safetensors only): PEFT / diffusers keys
(``unet.<module>.lora_A.weight`` / ``lora_B``, or the older ``lora.down`` / ``lora.up``) and kohya-style keys
(``lora_unet_…``, converted by diffusers' own ``lora_state_dict``), with the scale PEFT would use: ``lora_alpha / r``
from the file's adapter metadata (``alpha_pattern`` / ``rank_pattern`` per module, rsLoRA's ``alpha / √r``), or the
per-module ``alpha`` of kohya files, else 1. Each LoRA pair targets one Linear or Conv2d of the dense UNet by its
qualified name; the pruned graph keeps the names of the modules it keeps, so the pair is fused there
(``W += scale · B @ A``). Pairs whose module lies inside a removed operator are dropped and reported (how many,
what share of the LoRA's parameters); a pair for a module the dense UNet does not have is an error (a LoRA for
another architecture).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldpruner.base.errors import ConfigError

__all__ = ["LoRA", "LoRAPair", "apply_lora", "read_lora"]

@dataclasses.dataclass(frozen=True)
class LoRAPair:
    module: str  # qualified name in the dense UNet
    down: torch.Tensor  # lora_A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # lora_B: (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (rsLoRA: alpha / sqrt(r)), 1 without an alpha

    @property
    def params(self) -> int:
        return self.down.numel() + self.up.numel()


@dataclasses.dataclass(frozen=True)
class LoRA:
    pairs: tuple[LoRAPair, ...]
    source: str
    ignored: tuple[str, ...]  # keys for other components (text encoders) that a UNet LoRA does not use

    @property
    def params(self) -> int:
        return sum(p.params for p in self.pairs)


def read_lora(path: str | os.PathLike, unet_config: Mapping[str, Any] | None = None) -> LoRA:
    """The UNet LoRA pairs of a safetensors LoRA file (PEFT, diffusers or kohya keys); ``unet_config`` (the dense
    UNet's) lets diffusers map SDXL kohya block names (input_blocks/middle_block/output_blocks)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ConfigError(f"LoRA {str(path)!r} is not a .safetensors file (ldpruner never loads pickled LoRAs)")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"LoRA {str(path)!r} is not a readable safetensors file: {exc}") from exc
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state):
        raise ConfigError(f"LoRA {str(path)!r} is a DoRA (it has magnitude vectors); fusing DoRA is not supported")
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, network_alphas = StableDiffusionPipeline.lora_state_dict(
        state, unet_config=dict(unet_config) if unet_config is not None else None)
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    ignored = tuple(sorted(k for k in state if not k.startswith("unet.")))
    if not unet and state and not ignored:  # keys without a component prefix: a bare UNet LoRA
        unet = dict(state)
    unet = convert_unet_state_dict_to_peft(unet)
    config = _adapter_metadata(metadata)
    # kohya alphas are keyed like their lora_down weights: converted the same way, they name the module
    raw = {k.removeprefix("unet.").removesuffix(".alpha"): float(v) for k, v in (network_alphas or {}).items()
           if not k.startswith(("text_encoder", "lora_te"))}
    alphas = {k.removesuffix(".lora_A.weight"): v for k, v in convert_unet_state_dict_to_peft(raw).items()
              if k.endswith(".lora_A.weight")} | {k: v for k, v in raw.items() if not k.endswith(".weight")}
    pairs = []
    for key in sorted(unet):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = unet.get(f"{module}.lora_B.weight")
        if up is None:
            raise ConfigError(f"LoRA {str(path)!r} has {key} without its lora_B")
        down = unet[key]
        rank = down.shape[0]
        pairs.append(LoRAPair(module, down, up, _scale(module, rank, config, alphas)))
    stray = sorted(k for k in unet if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if stray:
        raise ConfigError(f"LoRA {str(path)!r} has keys ldpruner cannot fuse: {stray[:5]}"
                          f"{' …' if len(stray) > 5 else ''} (only lora_A/lora_B weight pairs)")
    if not pairs:
        raise ConfigError(f"LoRA {str(path)!r} holds no UNet LoRA weights (keys: {sorted(state)[:5]})")
    return LoRA(tuple(pairs), str(path), ignored)


def _adapter_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the LoRA's lora_adapter_metadata is not JSON: {exc}") from exc
    return {k.removeprefix("unet."): v for k, v in data.items() if k.startswith("unet.")}


def _scale(module: str, rank: int, config: Mapping[str, Any], alphas: Mapping[str, float]) -> float:
    if module in alphas:
        return alphas[module] / rank
    if not config:
        return 1.0
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
    r = _pattern_value(config.get("rank_pattern"), module, rank)
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    r"""PEFT's rule for alpha_pattern / rank_pattern: the first pattern that matches the module's name as a regular
    expression at the end of it (``(.*\.)?pattern$``) gives the value."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def apply_lora(gm: nn.Module, lora: LoRA, *, removed: tuple[str, ...], kept: tuple[str, ...] = (),
               scale: float = 1.0) -> dict[str, Any]:
    """Fuse ``lora`` (times ``scale``) into the modules of ``gm`` (a pruned graph; changed in place). ``removed``: the
    plan's removed operators, inside which a pair is dropped, except under ``kept`` (what a removal keeps: a
    shortcut removal's ``conv_shortcut``). Returns the report: pairs fused and dropped, and the dropped share of the
    LoRA's parameters."""
    fused, dropped, unknown = [], [], []
    for pair in lora.pairs:
        inside = next((r for r in removed if pair.module == r or pair.module.startswith(f"{r}.")), None)
        if inside is not None and any(pair.module == k or pair.module.startswith(f"{k}.") for k in kept):
            inside = None
        if inside is not None:
            dropped.append((pair, inside))
            continue
        try:
            target = gm.get_submodule(pair.module)
        except AttributeError:
            unknown.append(pair.module)
            continue
        if not isinstance(target, (nn.Linear, nn.Conv2d)):
            raise ConfigError(f"the LoRA targets {pair.module}, a {type(target).__name__}; ldpruner fuses LoRA into "
                              "Linear and Conv2d layers")
        _fuse(target, pair, scale)
        fused.append(pair)
    if unknown:
        raise ConfigError(f"the LoRA targets modules the UNet does not have: {unknown[:5]}"
                          f"{' …' if len(unknown) > 5 else ''}; it was trained for another architecture")
    dropped_params = sum(p.params for p, _ in dropped)
    return {
        "source": lora.source,
        "scale": scale,
        "pairs": len(lora.pairs),
        "fused": len(fused),
        "dropped": len(dropped),
        "lora_params": lora.params,
        "dropped_params": dropped_params,
        "dropped_fraction": dropped_params / lora.params if lora.params else 0.0,
        "dropped_modules": {p.module: op for p, op in dropped},
        "ignored_keys": len(lora.ignored),
    }


def _fuse(target: nn.Module, pair: LoRAPair, scale: float) -> None:
    weight = target.weight
    down, up = pair.down.to(torch.float32), pair.up.to(torch.float32)
    if isinstance(target, nn.Conv2d):
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) if down.dim() == 4 else None
    else:
        delta = up @ down
    if delta is None or delta.shape != weight.shape:
        raise ConfigError(f"the LoRA pair for {pair.module} has shapes A {tuple(pair.down.shape)}, B "
                          f"{tuple(pair.up.shape)}, which do not fit its weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.add_((delta * (pair.scale * scale)).to(device=weight.device, dtype=weight.dtype))
