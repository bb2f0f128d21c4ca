"""onnxruntime sessions: provider choice, options, errors, and the IO-binding path against the plain path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ldpruner.base.errors import ArtifactError, ConfigError, UnsupportedInputError
from ldpruner.runtime.session import create_session, default_providers


@pytest.fixture
def affine_model(tmp_path):
    """y = x * w + b with a dynamic batch, z = 2 * x (two outputs)."""
    w = numpy_helper.from_array(np.array([1.5, -2.0, 0.25], dtype=np.float32), "w")
    b = numpy_helper.from_array(np.array([0.5, 0.0, -1.0], dtype=np.float32), "b")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Mul", ["x", "two"], ["z"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [w, b, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "affine.onnx"
    onnx.save(model, str(path))
    return path


def test_provider_choice_and_options(affine_model):
    session = create_session(affine_model, threads=1, graph_optimization_level="basic")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    expected = "CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider"
    assert session.provider == expected == default_providers()[0]
    assert default_providers()[-1] == "CPUExecutionProvider"
    options = session.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session.input_names == ("x",) and session.output_names == ("y", "z")
    assert session.input_shapes["x"] == ["batch", 3]
    y, z = session.run({"x": np.array([[1.0, 2.0, 4.0]], dtype=np.float32)})
    np.testing.assert_array_equal(y, [[2.0, -4.0, 0.0]])
    np.testing.assert_array_equal(z, [[2.0, 4.0, 8.0]])


def test_bad_arguments_are_all_reported(affine_model, tmp_path):
    with pytest.raises(ConfigError) as info:
        create_session(affine_model, providers=["TensorrtExecutionProvider", "CPUExecutionProvider"], threads=0,
                       graph_optimization_level="max")
    message = str(info.value)
    assert "['TensorrtExecutionProvider'] are not offered" in message
    assert "threads must be a positive int" in message and "graph_optimization_level must be one of" in message
    with pytest.raises(ArtifactError, match="does not exist"):
        create_session(tmp_path / "missing.onnx")


def test_torch_path_and_io_binding_agree(affine_model):
    session = create_session(affine_model, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y_plain, z_plain = session.run_torch({"x": x})
    # binding host memory exercises the same code path that keeps CUDA tensors on the GPU
    y_bound, z_bound = session.run_torch({"x": x}, {"y": (5, 3)}, io_binding=True)
    expected_y = x * torch.tensor([1.5, -2.0, 0.25]) + torch.tensor([0.5, 0.0, -1.0])
    torch.testing.assert_close(y_plain, expected_y)
    torch.testing.assert_close(y_bound, expected_y)  # written into the preallocated output
    torch.testing.assert_close(z_bound, 2 * x)  # allocated by onnxruntime
    torch.testing.assert_close(z_plain, 2 * x)
    # a non-contiguous input is made contiguous before its pointer is bound
    xt = torch.randn(3, 5).t()
    torch.testing.assert_close(session.run_torch({"x": xt}, io_binding=True)[1], 2 * xt)


def test_wrong_dtype_is_rejected_before_binding(affine_model):
    session = create_session(affine_model, providers=["CPUExecutionProvider"])
    with pytest.raises(UnsupportedInputError, match=r"x: torch.float64 \(model: float32\).*unknown inputs \['q'\]"):
        session.run_torch({"x": torch.zeros(2, 3, dtype=torch.float64), "q": torch.zeros(1)}, io_binding=True)
