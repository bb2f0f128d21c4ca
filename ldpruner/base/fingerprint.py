"""sha256 fingerprints of tensors: a module's weights (the identity every artifact made for a model records, and part
of the analysis cache key) and named tensors such as the conditioning rows. A tensor is hashed as
``name:dtype:[shape];`` followed by its raw bytes, so any dtype (bfloat16 has no numpy type) hashes without a
conversion, and another dtype, shape or name gives another fingerprint.

Part of the base layer: torch is imported when a function is called, never at import.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["update_with_tensor", "weights_fingerprint"]


def update_with_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed ``tensor`` under ``name`` to ``digest`` (a :mod:`hashlib` object): its name, dtype and shape, then its
    bytes."""
    import torch

    tensor = tensor.detach()
    digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
    # a byte view of the flat tensor: no dtype conversion and no copy when it is contiguous on the CPU
    digest.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over ``module``'s state_dict: every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        update_with_tensor(digest, name, tensor)
    return digest.hexdigest()
