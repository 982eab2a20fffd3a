"""The torch bridge: runs ONNX graphs with torch ops exactly like onnxruntime does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeslim.compressor.torchgraph import OnnxModule, UnsupportedModel


def ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def test_digits_outputs_match_onnxruntime(digits) -> None:
    model = digits.model()
    x = np.load(digits.val)["x"][:64]
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, ort_run(model, {"input": x}), rtol=1e-4, atol=1e-4)


def test_weights_are_parameters_and_write_back_round_trips(digits) -> None:
    model = digits.model()
    module = OnnxModule(model)
    assert set(module.weights()) == {t.name for t in model.graph.initializer}
    with torch.no_grad():
        module.weights()["classifier.3.bias"].add_(1.0)
    updated = module.write_back(model)
    bias = {t.name: numpy_helper.to_array(t) for t in updated.graph.initializer}[
        "classifier.3.bias"
    ]
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[
        "classifier.3.bias"
    ]
    np.testing.assert_allclose(bias, original + 1.0)
    assert [n.name for n in updated.graph.node] == [n.name for n in model.graph.node]


def test_transformer_style_ops_match_onnxruntime() -> None:
    """Embedding (Gather) + LayerNorm + attention-like MatMul/Softmax + Transpose/Reshape."""
    rng = np.random.default_rng(0)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", 6])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 6, 6])
    inits = [
        numpy_helper.from_array(rng.normal(size=(20, 8)).astype(np.float32), "emb"),
        numpy_helper.from_array(np.ones(8, np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias"),
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "wq"),
        numpy_helper.from_array(np.array([0, 6, 8], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "ln_scale", "ln_bias"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"]),
        helper.make_node("Reshape", ["q", "shape"], ["q2"]),
        helper.make_node("Transpose", ["q2"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q2", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["out"], axis=-1),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "t", [ids], [out], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.checker.check_model(model, full_check=True)
    feed = rng.integers(0, 20, size=(3, 6)).astype(np.int64)
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(feed))[0].numpy()
    np.testing.assert_allclose(got, ort_run(model, {"input_ids": feed}), rtol=1e-4, atol=1e-5)


def test_unsupported_operator_is_named() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="mix")], "g", [x], [y])
    )
    with pytest.raises(UnsupportedModel, match=r"Det \(node 'mix'\)"):
        OnnxModule(model)
