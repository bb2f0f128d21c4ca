"""Where a command's work runs, decided once: :func:`place` resolves the device, sets the threads every stage computes
with, joins the torchrun world, and yields a :class:`Placement` that the outermost call (an API function, ``build``,
``bench``) hands down to every stage. Nothing below it resolves a device name or joins a process group again.

Part of the base layer: torch is imported when a function is called, never at import (onnxruntime only for a CUDA
device, to ask whether its provider is there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from ldpruner.base import devices, distributed
from ldpruner.base.distributed import World

__all__ = ["Placement", "place"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """``device`` (a torch.device) where models run; ``threads``: torch's intra-op threads and every onnxruntime
    session's; ``world``: this process's rank among the torchrun processes; ``providers``: the onnxruntime
    execution providers the numeric checks and timings use on that device (CUDA's first where it is there)."""

    device: Any
    threads: int
    world: World = World()
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @property
    def on_cuda_provider(self) -> bool:
        """onnxruntime runs on the GPU: the export's checks and optimizer target CUDA."""
        return "CUDAExecutionProvider" in self.providers

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "threads": self.threads, "rank": self.world.rank,
                "world_size": self.world.size, "providers": list(self.providers)}


def _providers(device: Any) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("CPUExecutionProvider",)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


@contextlib.contextmanager
def place(device: str = "auto", threads: int | None = None, *, join: bool = True) -> Iterator[Placement]:
    """The placement of one command: ``device`` resolved (:func:`ldpruner.base.devices.resolve_device`), torch's threads
    set to ``threads`` (:func:`ldpruner.base.devices.intra_op_threads`; restored after), and — for a command whose ranks
    share its work (``join``: analyze, distill, build, bench) — the torchrun world joined (NCCL on a GPU, gloo on
    CPUs; left after when it was joined here). A command that works alone (inspect, costs, prune, export) joins
    nothing: under torchrun each rank may call it by itself."""
    resolved = devices.resolve_device(device)
    with devices.intra_op_threads(threads) as count:
        world = distributed.join(resolved) if join else World()
        try:
            yield Placement(resolved, count, world, _providers(resolved))
        finally:
            distributed.leave(world)
