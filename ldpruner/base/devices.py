"""Where work runs and what it costs in memory: device names resolved to torch devices, dtypes by name, the
accelerator's name for reports, copies of a model cast to another device and dtype without a second full-precision
copy, peak memory (CUDA allocator, or the process's resident high-water mark on the host), and the CPU threads a
stage computes with (the CPUs this process may use, torch's intra-op threads for the length of a stage).

Part of the base layer: torch is imported when a function is called, never at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ConfigError

__all__ = [
    "DEVICE_HELP",
    "DTYPES",
    "THREADS_HELP",
    "accelerator_name",
    "available_cpus",
    "busy_load",
    "cast_copy",
    "cpus_in_use",
    "cgroup_cpu_limit",
    "check_device",
    "describe",
    "intra_op_threads",
    "load_average",
    "peak_memory",
    "reset_peak_memory",
    "resolve_device",
    "resolve_threads",
    "stage_threads",
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


def describe(device: Any, dtype: Any) -> dict[str, Any]:
    """What a report records about where a stage ran (with torch's intra-op threads as it runs)."""
    import torch

    return {"device": str(torch.device(device)), "dtype": str(dtype).removeprefix("torch."),
            "accelerator": accelerator_name(device), "threads": torch.get_num_threads()}


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


# --- CPU threads -----------------------------------------------------------------------------------------------------

THREADS_HELP = ("intra-op threads of torch and of every onnxruntime session the stage opens (the default leaves the "
                "cores other jobs keep busy to them: threads competing for a core slow every step)")
# the threads of the stage running in this context (None outside one): what a nested stage and the onnxruntime
# sessions opened inside it use when not told otherwise
_STAGE_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("ldpruner_stage_threads", default=None)


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup", proc: str | os.PathLike = "/proc/self/cgroup"
                     ) -> float | None:
    """The CPUs this process's cgroup CPU quota grants (quota / period), the smallest along its cgroup path; None
    without a quota. cgroup v2 reads ``cpu.max`` ("max 100000" or "200000 100000"), v1 ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us`` (a quota of -1 is none); ``proc`` names the process's cgroups (``/proc/self/cgroup``)."""
    root = Path(root)
    v2, v1 = "/", "/"
    try:
        for line in Path(proc).read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    limits = []
    for folder in _cgroup_folders(root, v2):
        words = _read_words(folder / "cpu.max")
        if len(words) == 2 and words[0] != "max" and _positive(words[0]) and _positive(words[1]):
            limits.append(int(words[0]) / int(words[1]))
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for folder in _cgroup_folders(base, v1):
            quota, period = _read_words(folder / "cpu.cfs_quota_us"), _read_words(folder / "cpu.cfs_period_us")
            if len(quota) == 1 and len(period) == 1 and _positive(quota[0]) and _positive(period[0]):
                limits.append(int(quota[0]) / int(period[0]))
    return min(limits) if limits else None


def _cgroup_folders(base: Path, path: str) -> list[Path]:
    """``base/path`` and every folder above it up to ``base`` (those that exist)."""
    parts = [p for p in path.split("/") if p and p != ".."]
    folders = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _positive(word: str) -> bool:
    return word.isdigit() and int(word) > 0


def available_cpus() -> int:
    """How many CPUs this process may use: its CPU affinity (``os.sched_getaffinity``; ``os.cpu_count`` where
    there is none), capped by the whole CPUs its cgroup quota grants (:func:`cgroup_cpu_limit`); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.floor(limit))  # more threads than whole CPUs would be throttled by the quota
    return max(1, cpus)


def cpus_in_use(window: float = 0.25, stat: str | os.PathLike = "/proc/stat") -> float | None:
    """How many CPUs the machine kept busy over the next ``window`` seconds (the aggregate ``cpu`` line of
    ``/proc/stat``: time not idle nor waiting for I/O); None where it cannot be read."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path(stat).read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        if len(fields) < 5:
            return None
        return sum(fields[:8]), fields[3] + fields[4]  # all time (user … steal), idle + iowait

    first = sample()
    if first is None:
        return None
    time.sleep(window)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (total - idle) / total * (os.cpu_count() or 1)


def stage_threads() -> int | None:
    """The threads of the stage running in this context (:func:`intra_op_threads`), or None outside one."""
    return _STAGE_THREADS.get()


def resolve_threads(threads: int | None) -> int:
    """The threads a stage computes with: ``threads`` when given; else the enclosing stage's (a stage run inside
    another, as the bench runs the analysis); else the CPUs this process may use (:func:`available_cpus`) less
    those other processes keep busy as it starts (:func:`cpus_in_use`; at least 1: threads that wait for a core
    another job holds make every parallel step wait, measured 5.6× slower on a 2-core machine with one other 2-thread
    job), no more than torch's own setting (``OMP_NUM_THREADS``, ``torch.set_num_threads``; torchrun gives each rank
    1)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r} must be a positive int or None (the CPUs this process may use)")
        return threads
    outer = stage_threads()
    if outer is not None:
        return outer
    import torch

    cpus = min(torch.get_num_threads(), available_cpus())
    if cpus > 1:  # one thread needs no free core to itself
        busy = cpus_in_use()
        if busy is not None:
            cpus -= math.floor(busy + 0.5)  # a job using half a core or more takes one
    return max(1, cpus)


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads set to :func:`resolve_threads` of ``threads`` for the block (restored after), which
    is also what every onnxruntime session opened inside it uses unless told otherwise; yields the number."""
    import torch

    count = resolve_threads(threads)
    before = torch.get_num_threads()
    token = _STAGE_THREADS.set(count)
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        _STAGE_THREADS.reset(token)
        torch.set_num_threads(before)


def load_average() -> float | None:
    """The system's 1-minute load average (None where it is unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_load(cpus: int | None = None) -> float | None:
    """The 1-minute load average when it exceeds ``cpus`` (None: :func:`available_cpus`) — other jobs compete for the
    cores, and a stage with one thread is often faster — else None (also where the load average is unknown)."""
    load = load_average()
    return load if load is not None and load > (cpus if cpus is not None else available_cpus()) else None
