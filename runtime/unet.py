"""ORTUNet: an exported UNet run by onnxruntime, callable like a diffusers UNet inside a stock pipeline.

It takes the arguments of ``UNet2DConditionModel.forward`` / ``UNet2DModel.forward`` and returns their output
classes; ``.config`` is the original UNet's config (pipelines read ``in_channels``, ``sample_size``,
``time_cond_proj_dim`` from it), ``.dtype`` / ``.device`` say what tensors the pipeline should create.
Arguments the exported graph has no input for (ControlNet residuals, attention masks, LoRA scales, ...) are
rejected when they are not None, never silently ignored.
"""

from __future__ import annotations

import json
import logging
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from ldpruner.base.errors import ArtifactError
from ldpruner.base.io import read_json
from ldpruner.base.unet_inputs import FLAT_INPUTS, INTRA_RESIDUAL, MID_RESIDUAL, residual_names

from .dropin import UNetDropIn
from .session import OrtSession, create_session

__all__ = ["ORTUNet", "ONNX_FILENAME", "CONFIG_FILENAME", "EXPORT_METADATA_KEY", "load_unet_config"]

logger = logging.getLogger("ldpruner.runtime")

ONNX_FILENAME = "unet.onnx"
CONFIG_FILENAME = "config.json"
EXPORT_METADATA_KEY = "ldpruner.export"  # JSON written by ldpruner.passes.onnx.export into the model's metadata_props

# Graph inputs ORTUNet knows how to fill, in the order the tracer emits them.
_KNOWN_INPUTS = FLAT_INPUTS
_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
}


def load_unet_config(path: str | os.PathLike[str]) -> FrozenDict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"UNet config {str(path)!r} does not exist; export with unet_config=unet.config or pass config= to ORTUNet"
        )
    data = read_json(path, what="UNet config")
    return FrozenDict(data)


class ORTUNet(UNetDropIn):
    """A drop-in for a diffusers UNet whose forward runs an ONNX model in onnxruntime.

    ``model``: an ``OrtSession`` or the path of an ``.onnx`` file. ``config``: the original UNet's config (a
    mapping); None reads ``config.json`` beside the ONNX file. ``providers`` / ``threads`` go to
    :func:`create_session` when a path is given.
    """

    def __init__(
        self,
        model: OrtSession | str | os.PathLike[str],
        config: Mapping[str, Any] | None = None,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        super().__init__()
        if not isinstance(model, OrtSession):
            model = create_session(model, providers=providers, threads=threads)
        session = model
        if config is None:
            config = load_unet_config(session.path.with_name(CONFIG_FILENAME))
        if not isinstance(config, Mapping):
            raise ArtifactError(f"config must be a mapping (e.g. unet.config), got {type(config).__name__}")
        unknown = [n for n in session.input_names if n not in _KNOWN_INPUTS and n != MID_RESIDUAL
                   and not residual_names([n]) and not residual_names([n], INTRA_RESIDUAL)]
        names = session.input_names
        if unknown or not names or names[0] != "sample" or "timestep" not in names:
            raise ArtifactError(
                f"{session.path.name} has inputs {list(names)}; ORTUNet needs 'sample' first, 'timestep', "
                f"and otherwise only {list(_KNOWN_INPUTS[2:])} (unknown: {unknown})"
            )
        if len(session.output_names) != 1:
            raise ArtifactError(
                f"{session.path.name} has outputs {list(session.output_names)}; ORTUNet needs exactly one"
            )
        self.session = session
        self._internal_dict = FrozenDict(dict(config))
        class_name = self._internal_dict.get("_class_name")
        self._conditional = (
            class_name == "UNet2DConditionModel" if class_name else "encoder_hidden_states" in session.input_names
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        onnx_name: str = ONNX_FILENAME,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> ORTUNet:
        """Load ``<folder>[/<subfolder>]/unet.onnx`` (+ ``unet.onnx.data``) and its ``config.json``."""
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{str(folder)!r} is not a folder holding {onnx_name} and {CONFIG_FILENAME}")
        config = load_unet_config(folder / CONFIG_FILENAME)
        return cls(folder / onnx_name, config, providers=providers, threads=threads)

    # --- what pipelines read ----------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the pipeline should create latents in: the graph's sample input dtype."""
        return _TORCH_DTYPES[self.session.input_dtypes["sample"]]

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.session.device_id) if self.session.on_cuda else torch.device("cpu")

    def _attribute(self, name: str) -> Any:
        config = self._internal_dict
        if name == "add_embedding" and config.get("addition_embed_type") == "text_time":
            # StableDiffusionXLPipeline checks its time ids against add_embedding.linear_1.in_features
            width = config.get("projection_class_embeddings_input_dim")
            return types.SimpleNamespace(linear_1=types.SimpleNamespace(in_features=width))
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def extra_repr(self) -> str:
        session = self.session
        return f"path={str(session.path)!r}, provider={session.provider}, inputs={list(session.input_names)}"

    # --- the call (UNetDropIn.forward checks it) --------------------------------------------------------------
    _caller = "ORTUNet.forward"

    @property
    def _what(self) -> str:
        return self.session.path.name

    def _input_names(self) -> Sequence[str]:
        return self.session.input_names

    def _metadata(self) -> dict[str, Any]:
        """What the exporter recorded in the model (:data:`EXPORT_METADATA_KEY`); {} for a model from elsewhere."""
        raw = self.session.session.get_modelmeta().custom_metadata_map.get(EXPORT_METADATA_KEY)
        try:
            metadata = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return metadata if isinstance(metadata, dict) else {}

    def _example_shapes(self) -> Mapping[str, Sequence[int]] | None:
        return self._metadata().get("input_shapes")

    def _declared_shapes(self) -> Mapping[str, Sequence[int | None]]:
        # the model's own declaration: a named (symbolic) or unknown dimension is free
        return {name: [d if isinstance(d, int) else None for d in dims]
                for name, dims in self.session.input_shapes.items()}

    def _spatial_multiple(self) -> int | None:
        metadata = self._metadata()
        multiple = metadata.get("spatial_multiple")
        return multiple if metadata.get("dynamic_spatial") and isinstance(multiple, int) and multiple > 1 else None

    def _class_name(self) -> str | None:
        return "UNet2DConditionModel" if self._conditional else "UNet2DModel"

    def _run(self, inputs: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        feeds = {name: value.to(_TORCH_DTYPES[self.session.input_dtypes[name]]) for name, value in inputs.items()}
        output_shapes = None
        out_channels = self._internal_dict.get("out_channels")
        if isinstance(out_channels, int):
            output_shapes = {self.session.output_names[0]: (sample.shape[0], out_channels, *sample.shape[2:])}
        (out,) = self.session.run_torch(feeds, output_shapes)
        return out.to(sample.device)

    def _timestep_dtype(self) -> torch.dtype | None:
        return _TORCH_DTYPES[self.session.input_dtypes["timestep"]]
