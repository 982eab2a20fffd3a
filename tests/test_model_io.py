"""Loading source models: ONNX checks, TorchScript conversion, pickles refused."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeslim.compressor import model_io
from edgeslim.errors import BadInput


def test_onnx_loads_and_is_fully_checked(digits) -> None:
    model = model_io.load_model(digits.model_path, "src")
    assert [n.op_type for n in model.graph.node][:2] == ["Conv", "Relu"]


def test_corrupt_onnx_is_bad_input(tmp_path: Path, digits) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(digits.model_path.read_bytes()[:5000])
    with pytest.raises(BadInput, match="not a valid ONNX"):
        model_io.load_model(broken, "source model broken.onnx")


def test_onnx_that_fails_the_checker_is_bad_input(tmp_path: Path) -> None:
    # A Gemm whose weight disagrees with its input: structurally parseable, semantically wrong.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    w = numpy_helper.from_array(np.ones((5, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(BadInput, match="ONNX check failed"):
        model_io.load_model(path, "bad.onnx")


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(BadInput, match="outside the model's folder"):
        model_io.load_model(path, "model.onnx")


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_pickled_checkpoints_are_refused_with_advice(tmp_path: Path) -> None:
    zipped = tmp_path / "model.pt"
    torch.save(_Tiny(), zipped)  # torch's zip format: data.pkl inside
    legacy = tmp_path / "model.pkl"
    legacy.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    for path in (zipped, legacy):
        assert model_io.sniff(path) == "pickle"
        with pytest.raises(BadInput, match="unpickling runs arbitrary code") as info:
            model_io.load_model(path, f"source model {path.name}")
        assert "torch.onnx.export" in str(info.value)


def test_torchscript_is_converted_to_onnx_with_the_same_outputs(tmp_path: Path) -> None:
    module = _Tiny().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(module).save(str(path))
    example = {"x": np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)}
    model = model_io.load_model(path, "scripted.pt", example, allow_model_code=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, example)[0]
    with torch.no_grad():
        want = module(torch.from_numpy(example["x"])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    buffer = io.BytesIO()
    onnx.save(model, buffer)  # serialisable as a normal ONNX file
    assert buffer.tell() > 0


def test_torchscript_without_the_opt_in_is_refused_before_any_of_its_code_runs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(_Tiny().eval()).save(str(path))
    example = {"x": np.zeros((1, 4), np.float32)}
    with pytest.raises(BadInput, match="runs the model's own code") as info:
        model_io.load_model(path, "source model scripted.pt", example)
    assert "allowModelCode: true" in str(info.value) and "\n" not in str(info.value)
