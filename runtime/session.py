"""onnxruntime sessions: pick the execution provider, set session options, run with tensors kept on device.

CUDA is used when onnxruntime offers it (``onnxruntime-gpu``), else the CPU provider. On CUDA, torch tensors
that already live on the GPU are bound with IO binding, so a denoising loop never copies latents to the host;
on CPU a plain ``InferenceSession.run`` on numpy arrays is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ldpruner.base.devices import stage_threads
from ldpruner.base.errors import ArtifactError, ConfigError, UnsupportedInputError

if TYPE_CHECKING:
    import torch

__all__ = ["OrtSession", "create_session", "default_providers", "GRAPH_OPTIMIZATION_LEVELS"]

logger = logging.getLogger("ldpruner.runtime")

GRAPH_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# ONNX tensor type strings (as InferenceSession reports them) → numpy dtypes.
_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always last."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtSession:
    """An ``InferenceSession`` plus the provider it really runs on (``provider``) and its IO types."""

    def __init__(self, session: ort.InferenceSession, path: Path):
        self.session = session
        self.path = path
        self.provider: str = session.get_providers()[0]
        self.input_names: tuple[str, ...] = tuple(i.name for i in session.get_inputs())
        self.output_names: tuple[str, ...] = tuple(o.name for o in session.get_outputs())
        self.input_dtypes: dict[str, np.dtype] = {i.name: _numpy_dtype(i.type, i.name) for i in session.get_inputs()}
        self.output_dtypes: dict[str, np.dtype] = {o.name: _numpy_dtype(o.type, o.name) for o in session.get_outputs()}
        self.input_shapes: dict[str, list[int | str | None]] = {i.name: list(i.shape) for i in session.get_inputs()}

    @property
    def on_cuda(self) -> bool:
        return self.provider == "CUDAExecutionProvider"

    @property
    def device_id(self) -> int:
        if not self.on_cuda:
            return 0
        options = self.session.get_provider_options().get("CUDAExecutionProvider", {})
        return int(options.get("device_id", 0))

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Plain run on host arrays (the CPU path; also correct, with copies, on CUDA)."""
        return self.session.run(list(self.output_names), dict(feeds))

    def run_torch(
        self,
        feeds: Mapping[str, torch.Tensor],
        output_shapes: Mapping[str, Sequence[int]] | None = None,
        *,
        io_binding: bool | None = None,
    ) -> list[torch.Tensor]:
        """Run on torch tensors (of the model's input dtypes).

        ``io_binding`` None (default) binds in place exactly when the session runs on CUDA and every input is
        already a CUDA tensor, so latents never leave the device; outputs whose shape is given in
        ``output_shapes`` are written straight into preallocated tensors. Otherwise the tensors go through host
        numpy arrays. ``io_binding=True`` forces binding (on CPU it binds host memory: no copies either)."""
        import torch

        wrong = [
            f"{name}: {t.dtype} (model: {self.input_dtypes[name].name})"
            for name, t in feeds.items()
            if name in self.input_dtypes and t.dtype != _torch_dtype(self.input_dtypes[name])
        ]
        unknown = [name for name in feeds if name not in self.input_dtypes]
        if wrong or unknown:
            raise UnsupportedInputError(
                f"run_torch on {self.path.name}: inputs of the wrong dtype {wrong}; unknown inputs {unknown} "
                f"(model inputs: {list(self.input_names)})"
            )
        if io_binding is None:
            io_binding = self.on_cuda and all(t.device.type == "cuda" for t in feeds.values())
        if io_binding:
            wanted = "cuda" if self.on_cuda else "cpu"
            misplaced = [name for name, t in feeds.items() if t.device.type != wanted]
            if misplaced:
                raise ConfigError(f"io_binding on {self.provider} needs {wanted} tensors; {misplaced} are elsewhere")
            return self._run_bound(feeds, output_shapes or {})
        arrays = {name: t.detach().cpu().numpy() for name, t in feeds.items()}
        return [torch.from_numpy(a) for a in self.run(arrays)]

    def _run_bound(self, feeds: Mapping[str, torch.Tensor], output_shapes: Mapping[str, Sequence[int]]):
        import torch

        binding = self.session.io_binding()
        device_type, device_id = ("cuda", self.device_id) if self.on_cuda else ("cpu", 0)
        device = torch.device("cuda", device_id) if self.on_cuda else torch.device("cpu")
        kept = []  # contiguous copies must stay alive until the run ends
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            kept.append(tensor)
            binding.bind_input(
                name=name,
                device_type=device_type,
                device_id=(tensor.device.index or 0) if self.on_cuda else 0,
                element_type=self.input_dtypes[name].type,
                shape=tuple(tensor.shape),
                buffer_ptr=tensor.data_ptr(),
            )
        outputs: list[torch.Tensor | None] = []
        for name in self.output_names:
            if name in output_shapes:
                out = torch.empty(
                    tuple(output_shapes[name]),
                    dtype=_torch_dtype(self.output_dtypes[name]),
                    device=device,
                )
                binding.bind_output(
                    name=name,
                    device_type=device_type,
                    device_id=device_id,
                    element_type=self.output_dtypes[name].type,
                    shape=tuple(out.shape),
                    buffer_ptr=out.data_ptr(),
                )
                outputs.append(out)
            else:
                binding.bind_output(name, device_type, device_id)
                outputs.append(None)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        unbound = binding.get_outputs()
        return [
            out if out is not None else torch.from_numpy(unbound[i].numpy()).to(device)
            for i, out in enumerate(outputs)
        ]


def create_session(
    path: str | os.PathLike[str],
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    graph_optimization_level: str = "all",
    exact_fp32: bool = False,
) -> OrtSession:
    """Open an ONNX model with onnxruntime.

    ``providers``: execution providers in priority order; None picks CUDA when available, else CPU. A provider
    that this onnxruntime build lacks raises :class:`ConfigError`; so does an explicit CUDA request that
    onnxruntime silently degraded to CPU (e.g. a missing CUDA library). ``threads``: intra-op threads (None: those of
    the ldpruner stage this runs in, :func:`ldpruner.base.devices.stage_threads`; outside one, onnxruntime's default,
    one per core). ``exact_fp32``: on the CUDA provider, no TF32 matrix products (it uses
    them on Ampere and newer GPUs by default, about 1e-3 relative error), so float32 results can be compared with
    torch's at float32 tolerance. The chosen provider is logged and kept in ``OrtSession.provider``.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX model {str(path)!r} does not exist; export one with ldpruner.passes.onnx.export")
    explicit = providers is not None
    providers = list(providers) if providers is not None else default_providers()
    problems = []
    available = ort.get_available_providers()
    if not providers:
        problems.append("providers is empty; pass None to choose automatically or e.g. ['CPUExecutionProvider']")
    missing = [p for p in providers if p not in available]
    if missing:
        problems.append(f"providers {missing} are not offered by this onnxruntime build; available: {available}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        problems.append(f"threads must be a positive int or None, got {threads!r}")
    if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
        problems.append(
            f"graph_optimization_level must be one of {sorted(GRAPH_OPTIMIZATION_LEVELS)}, "
            f"got {graph_optimization_level!r}"
        )
    if problems:
        raise ConfigError("create_session: " + "; ".join(problems))

    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[graph_optimization_level]
    threads = threads if threads is not None else stage_threads()
    if threads is not None:
        options.intra_op_num_threads = threads
    chosen: list[Any] = [(p, {"use_tf32": "0"}) if exact_fp32 and p == "CUDAExecutionProvider" else p
                         for p in providers]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:
        # a file onnxruntime cannot parse, or whose external data is missing or short, is damaged; other failures
        # (an operator this build lacks, a provider that cannot start) are onnxruntime's own, left as they are
        text = " ".join(str(exc).split())
        signs = ("INVALID_PROTOBUF", "NO_SUCHFILE", "external data", "external initializer", "out of bounds")
        if type(exc).__name__ not in ("InvalidProtobuf", "NoSuchFile") and not any(
                sign.lower() in text.lower() for sign in signs):
            raise
        first = text if len(text) <= 300 else text[:300] + " …"
        raise ArtifactError(f"onnxruntime cannot load {str(path)!r} ({type(exc).__name__}: {first}); the file (or "
                            "its .data file beside it) is damaged or incomplete: export it again") from exc
    wrapped = OrtSession(session, path)
    if explicit and wrapped.provider != providers[0]:
        raise ConfigError(
            f"create_session: asked for {providers[0]} first but onnxruntime fell back to {wrapped.provider} "
            "(see onnxruntime's log for why, e.g. a missing CUDA/cuDNN library); pass providers=None to accept "
            "the automatic choice"
        )
    logger.info("onnxruntime session for %s runs on %s", path.name, wrapped.provider)
    return wrapped


def _numpy_dtype(type_str: str, name: str) -> np.dtype:
    if type_str not in _ORT_TYPES:
        raise ArtifactError(f"ONNX input/output {name!r} has type {type_str}, which ldpruner's runtime does not handle")
    return _ORT_TYPES[type_str]


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.bool_): torch.bool,
    }[np.dtype(dtype)]
