"""The stage functions on loaded objects (ldpruner.stages): what they take from the placement."""

from __future__ import annotations

import torch

from ldpruner.base.placement import Placement
from ldpruner.passes.config import ExportConfig
from ldpruner.stages import placed_export_config


def test_exports_are_validated_where_the_placement_runs():
    """The bench's dense export and every student's export check their ONNX model on the same provider."""
    cpu = Placement(torch.device("cpu"), 1)
    assert placed_export_config(None, cpu) == ExportConfig()
    cuda = Placement(torch.device("cuda"), 1, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert placed_export_config(None, cuda).validation_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    asked = ExportConfig(validation_providers=("CUDAExecutionProvider",))
    assert placed_export_config(asked, cuda) is asked  # a config that names CUDA's provider is kept as asked
    assert placed_export_config(asked, cpu) is asked
