"""Rank and world size under torch.distributed: the one place that joins the process group a launcher set up.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`join` initialises the default process group
from them when nobody has yet (NCCL when the work runs on a CUDA device, which it also makes the current one;
gloo otherwise) and says whether it did, so that the caller that initialised it can tear it down. Without a
launcher (or with ``WORLD_SIZE`` 1) it is rank 0 of 1 and nothing is initialised.

Part of the base layer: torch is imported when a function is called, never at import.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["World", "default_device", "join", "leave", "local_rank", "launched_world_size"]


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes; ``initialised_here`` when :func:`join` created the
    process group (the caller then owns it and ends it with :func:`leave`)."""

    rank: int = 0
    size: int = 1
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes artifacts."""
        return self.rank == 0


def launched_world_size() -> int:
    """The world size a launcher asked for (``WORLD_SIZE``; 1 when none is set)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 when none is set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> Any:
    """Where a rank works when nobody says: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    from .devices import resolve_device

    return resolve_device("auto")


def join(device: Any = None) -> World:
    """This process's :class:`World`, initialising the default process group when a launcher asked for more than
    one process and nobody initialised it yet: NCCL when ``device`` (where the work runs; None: the CPU) is a CUDA
    device, which becomes the current device, gloo otherwise."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), False)
    if launched_world_size() <= 1:
        return World()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", local_rank()))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size(), True)


def leave(world: World) -> None:
    """End the process group when ``world`` says :func:`join` created it here; otherwise do nothing."""
    if world.initialised_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
