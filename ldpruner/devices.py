"""Where work runs and what it costs in memory: device names resolved to torch devices, dtypes by name, the
accelerator's name for reports, copies of a model cast to another device and dtype without a second full-precision
copy, and peak memory (CUDA allocator, or the process's resident high-water mark on the host).

Part of the base layer: torch is imported when a function is called, never at import.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from typing import Any

from .errors import ConfigError

__all__ = [
    "DEVICE_HELP",
    "DTYPES",
    "accelerator_name",
    "cast_copy",
    "check_device",
    "describe",
    "peak_memory",
    "reset_peak_memory",
    "resolve_device",
    "torch_dtype",
]

DTYPES = ("float32", "float16", "bfloat16")
DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N; under torchrun cuda means the rank's GPU"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(value: str) -> list[str]:
    """The problems of a device name (for a config's ``check=``): none when it is auto, cpu, cuda or cuda:N."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        return [f"device={value!r} is not one of auto, cpu, cuda, cuda:N"]
    return []


def resolve_device(name: str) -> Any:
    """The torch device ``name`` means here: ``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` is
    ``cuda:LOCAL_RANK`` (the rank's GPU under torchrun, else GPU 0). Asking for CUDA without one, or for a GPU index
    that does not exist, is a ConfigError."""
    import torch

    problems = check_device(name)
    if problems:
        raise ConfigError(problems[0])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if ":" in name and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"device={name!r} names one GPU, but torchrun started {os.environ['WORLD_SIZE']} "
                          "processes: pass device='cuda' (or auto) and each rank uses its own GPU (LOCAL_RANK)")
    if name != "auto" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but torch sees no CUDA device (torch {torch.__version__}, "
                          f"cuda available: False); use device='cpu' or 'auto'")
    device = torch.device(name) if ":" in name else torch.device("cuda", local)
    if device.index >= torch.cuda.device_count():
        which = f"device={name!r}" if ":" in name else f"LOCAL_RANK={local}"
        raise ConfigError(f"{which} asks for GPU {device.index}, but torch sees {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return device


def torch_dtype(name: str) -> Any:
    """The torch dtype called ``name`` (one of :data:`DTYPES`)."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {list(DTYPES)}")
    return getattr(torch, name)


def accelerator_name(device: Any) -> str:
    """What runs the work: the GPU's name, or the host CPU's model."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    import platform

    return (platform.processor() or platform.machine() or "cpu") + f" ({os.cpu_count()} logical CPUs)"


def describe(device: Any, dtype: Any) -> dict[str, str]:
    """What a report records about where a stage ran."""
    import torch

    return {"device": str(torch.device(device)), "dtype": str(dtype).removeprefix("torch."),
            "accelerator": accelerator_name(device)}


def cast_copy(module: Any, device: Any, dtype: Any) -> Any:
    """A deep copy of ``module`` whose floating-point parameters and buffers are on ``device`` in ``dtype`` (other
    tensors keep their dtype). Each tensor is cast as it is copied, so memory holds the original plus the cast copy,
    never two copies at the original precision."""
    import torch

    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in memo:
            continue
        data = tensor.detach().to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype,
                                  copy=True)
        memo[id(tensor)] = (torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else data)
    return copy.deepcopy(module, memo)


def reset_peak_memory(device: Any) -> None:
    """Start a new peak on ``device``: the CUDA allocator's counter (the host's high-water mark cannot be reset by
    a process without losing it; :func:`peak_memory` reports it as the process's peak so far)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> dict[str, Any]:
    """The peak memory so far: on CUDA the allocator's peak since :func:`reset_peak_memory` (MiB), and always the
    process's resident-set high-water mark on the host (MiB; Linux ``VmHWM``, else ``ru_maxrss``)."""
    import torch

    device = torch.device(device)
    result: dict[str, Any] = {"host_peak_rss_mib": round(_host_peak_mib(), 1)}
    if device.type == "cuda":
        result["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["cuda_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return result


def _host_peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
