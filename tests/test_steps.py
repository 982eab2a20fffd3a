"""simplify, distill and quantize on the real digits model: each changes the model as it claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.api.spec import (
    DistillConfig,
    Metric,
    PruneConfig,
    QuantizeConfig,
    SimplifyConfig,
)
from edgeslim.compressor import datasets, evaluate, graph
from edgeslim.compressor.distill import Distill
from edgeslim.compressor.prune import Prune
from edgeslim.compressor.quantize import Quantize
from edgeslim.compressor.simplify import Simplify
from edgeslim.compressor.steps import StepContext
from edgeslim.errors import BadInput


def context(digits, tmp_path: Path) -> StepContext:
    return StepContext(
        source=digits.model(),
        workdir=tmp_path,
        load_dataset=lambda uri, sha, model: datasets.load(Path(uri), model, uri),
        load_model=lambda uri, sha: onnx.load(uri),
        evaluation_dataset=str(digits.val),
        train_datasets=[str(digits.train)],
    )


def accuracy(model: onnx.ModelProto, digits) -> float:
    data = datasets.load(digits.val, model)
    out = evaluate.run_batched(evaluate.session(model), data)
    return evaluate.metric(Metric.accuracy, out, out, data.labels)


def initializer_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer}


def test_simplify_folds_constants_and_turns_constant_nodes_into_initializers(
    tmp_path: Path, digits
) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [  # w2 = w + w computed at run time, and a weight stored as a Constant node
        helper.make_node("Add", ["w", "w"], ["w2"]),
        helper.make_node(
            "Constant", [], ["c"], value=numpy_helper.from_array(np.ones((4, 4), np.float32))
        ),
        helper.make_node("MatMul", ["x", "w2"], ["h"]),
        helper.make_node("MatMul", ["h", "c"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    out = Simplify(SimplifyConfig()).run(model, context(digits, tmp_path)).model
    ops = [n.op_type for n in out.graph.node]
    assert "Add" not in ops and "Constant" not in ops
    feed = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    np.testing.assert_allclose(
        evaluate.session(out).run(None, feed)[0], evaluate.session(model).run(None, feed)[0]
    )


def test_simplify_says_what_the_bytes_it_adds_are(tmp_path: Path, digits) -> None:
    """The digits model has nothing to fold, so simplify only writes the inferred
    shapes, and the step table shows it grew: the note accounts for every byte."""
    model = digits.model()
    assert not model.graph.value_info
    out = Simplify(SimplifyConfig()).run(model, context(digits, tmp_path))
    added = out.model.ByteSize() - model.ByteSize()
    assert added > 0
    shapes_only = onnx.ModelProto()
    shapes_only.CopyFrom(out.model)
    del shapes_only.graph.value_info[:]
    assert shapes_only.ByteSize() == model.ByteSize()  # the shapes are all it added
    note = next(n for n in out.notes if n.startswith("recorded the shapes"))
    assert f"{len(out.model.graph.value_info)} tensors (value_info, " in note
    said = int(note.rsplit(", ", 1)[1].split(" bytes")[0].replace(",", ""))
    assert added - 4 <= said <= added  # up to the graph's own length prefix


def test_distill_recovers_accuracy_and_keeps_pruned_weights_zero(tmp_path: Path, digits) -> None:
    ctx = context(digits, tmp_path)
    pruned = Prune(PruneConfig(method="magnitude", sparsity=0.9)).run(digits.model(), ctx).model
    before_acc, (_, zeros_before) = accuracy(pruned, digits), graph.weight_stats(pruned)
    out = Distill(DistillConfig(dataset=str(digits.train), epochs=3)).run(pruned, ctx)
    after_acc, (_, zeros_after) = accuracy(out.model, digits), graph.weight_stats(out.model)
    assert after_acc > before_acc + 0.02, (before_acc, after_acc)
    assert zeros_after >= zeros_before  # the mask held: training did not regrow pruned weights
    assert any("masks" in n for n in out.notes)


def test_distill_trains_a_bias_that_starts_at_zero(tmp_path: Path, digits) -> None:
    """Masks keep magnitude-pruned kernels sparse; a bias that is zero (all of it)
    is no pruned weight and must learn, as the classifier's does here."""
    model = digits.model()
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = gemm.input[2]
    width = numpy_helper.to_array(graph.initializer_map(model.graph)[bias]).shape
    graph.replace_initializer(model.graph, bias, np.zeros(width, np.float32))
    # No hold-out: the trained weights are kept even where the input scored as well.
    config = DistillConfig(dataset=str(digits.train), epochs=1, validation_split=0)
    out = Distill(config).run(model, context(digits, tmp_path))
    assert not any("masks" in n for n in out.notes), out.notes
    trained = numpy_helper.to_array(graph.initializer_map(out.model.graph)[bias])
    assert np.abs(trained).max() > 0, out.notes


def test_distill_refuses_a_student_with_other_inputs(tmp_path: Path, digits) -> None:
    x = helper.make_tensor_value_info("other", TensorProto.FLOAT, ["b", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 10])
    w = numpy_helper.from_array(np.zeros((64, 10), np.float32), "w")
    student = tmp_path / "student.onnx"
    onnx.save(
        helper.make_model(
            helper.make_graph(
                [helper.make_node("MatMul", ["other", "w"], ["y"])], "s", [x], [y], [w]
            )
        ),
        student,
    )
    cfg = DistillConfig(dataset=str(digits.train), epochs=1, student={"uri": str(student)})
    with pytest.raises(BadInput, match="do not match the source model's inputs"):
        Distill(cfg).run(digits.model(), context(digits, tmp_path))


def test_static_int8_stores_int8_weights_and_keeps_accuracy(tmp_path: Path, digits) -> None:
    out = (
        Quantize(QuantizeConfig(mode="static", calibration_samples=128))
        .run(digits.model(), context(digits, tmp_path))
        .model
    )
    assert TensorProto.INT8 in initializer_types(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in out.graph.node}
    assert len(out.SerializeToString()) < len(digits.model().SerializeToString()) / 3
    assert accuracy(out, digits) >= accuracy(digits.model(), digits) - 0.02


def test_op_types_and_exclude_nodes_restrict_quantization(tmp_path: Path, digits) -> None:
    model = digits.model()
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    out = (
        Quantize(
            QuantizeConfig(
                mode="static", calibration_samples=32, op_types=["Gemm"], exclude_nodes=gemms[:1]
            )
        )
        .run(model, context(digits, tmp_path))
        .model
    )
    int8 = {t.name for t in out.graph.initializer if t.data_type == TensorProto.INT8}
    assert any("classifier.3.weight" in n for n in int8)  # the second Gemm is quantized
    assert not any(
        "features" in n or "classifier.1.weight" in n for n in int8
    )  # Conv and excluded Gemm not


def test_dynamic_int8_quantizes_matmul_weights(tmp_path: Path, digits) -> None:
    out = (
        Quantize(QuantizeConfig(mode="dynamic"))
        .run(digits.model(), context(digits, tmp_path))
        .model
    )
    assert TensorProto.INT8 in initializer_types(out)
    assert accuracy(out, digits) >= accuracy(digits.model(), digits) - 0.02


def test_fp16_halves_the_weights_and_keeps_float32_io(tmp_path: Path, digits) -> None:
    model = digits.model()
    out = Quantize(QuantizeConfig(mode="fp16")).run(model, context(digits, tmp_path)).model
    assert TensorProto.FLOAT16 in initializer_types(out)
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert len(out.SerializeToString()) < 0.6 * len(model.SerializeToString())
    assert accuracy(out, digits) >= accuracy(model, digits) - 0.005


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"exclude_nodes": ["no-such-node"]}, "no node named 'no-such-node'"),
        ({"op_types": ["LSTM"]}, "none of these operators is in the model"),
    ],
)
def test_quantize_names_what_does_not_exist(
    tmp_path: Path, digits, config: dict, message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        Quantize(QuantizeConfig(mode="dynamic", **config)).run(
            digits.model(), context(digits, tmp_path)
        )


def test_cosine_is_scale_free() -> None:
    """An untrained detector head answers with values near 1e-14: the source against
    itself still scores 1, a sign flip -1, and an all-zero row against itself 1."""
    ref = np.array([[1e-14, -2e-14, 3e-14], [0.0, 0.0, 0.0]], np.float32)
    assert evaluate.metric(Metric.cosine, ref, ref, None) == pytest.approx(1.0)
    flipped = ref * np.array([[-1.0], [1.0]], np.float32)
    assert evaluate.metric(Metric.cosine, flipped, ref, None) == pytest.approx(0.0)
    assert evaluate.metric(Metric.cosine, ref * 1e20, ref, None) == pytest.approx(1.0)
