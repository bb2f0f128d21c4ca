"""Rank and world size under torch.distributed: the one place that joins the process group a launcher set up.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`join` initialises the default process group
from them when nobody has yet (NCCL when the work runs on a CUDA device, which it also makes the current one;
gloo otherwise) and says whether it did, so that the caller that initialised it can tear it down. Without a
launcher (or with ``WORLD_SIZE`` 1) it is rank 0 of 1 and nothing is initialised.

:func:`on_rank0` and :func:`share_from_rank0` are how rank 0 decides for every rank: it does the work, and every
rank gets its result or raises what it raised, so that no rank waits in a collective for one that failed.

Part of the base layer: torch is imported when a function is called, never at import.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

__all__ = ["World", "current", "join", "leave", "local_rank", "launched_world_size", "on_rank0",
           "share_from_rank0"]


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


def current() -> World:
    """This process's :class:`World` in the process group already joined (:func:`join`, by the command's placement);
    rank 0 of 1 when there is none. Never joins one."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return World()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), False)
    if launched_world_size() > 1:  # each rank would do all the work and write alone
        from ldpruner.base.errors import ConfigError

        raise ConfigError(f"launched as {launched_world_size()} processes (WORLD_SIZE), but no process group is "
                          "joined: make the command's placement first (ldpruner.base.placement.place) and pass its "
                          "world")
    return World()


def leave(world: World) -> None:
    """End the process group when ``world`` says :func:`join` created it here; otherwise do nothing."""
    if world.initialised_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def share_from_rank0(world: World, value: Any, error: BaseException | None) -> Any:
    """Rank 0's ``value`` on every rank, or the ``error`` rank 0 sends raised on every rank (every rank calls this
    at the same point: it is a collective)."""
    import torch.distributed as dist

    box = [(value, error) if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def on_rank0(world: World, together: bool, work: Callable[[], Any]) -> Any:
    """``work()`` done by rank 0; with ``together`` (every rank calls this) each rank gets its result, or raises
    what it raised, so that no rank waits in a collective for one that failed."""
    value = error = None
    if world.is_main:
        try:
            value = work()
        except Exception as exc:
            if not together:
                raise
            error = exc
    return share_from_rank0(world, value, error) if together else value
