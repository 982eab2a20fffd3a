"""The prune step on real ONNX models, checked with onnxruntime.

Models are built here (tiny torch exports and hand-written graphs) so these
tests stand alone and run in seconds. The exactness tests are the important
ones: when the removed channels contribute nothing (all-zero weights and
bias), the pruned model must give the same outputs as the original, which
only holds if every consumer (through Flatten, BatchNorm, GELU, ...) was
sliced at exactly the right indices.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeslim.api.spec import PruneConfig
from edgeslim.compressor.graph import weight_stats
from edgeslim.compressor.prune import Prune
from edgeslim.errors import BadInput

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------
# Model builders


def export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    module.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    return onnx.load_from_string(buf.getvalue())


class CNN(nn.Module):
    """The digits CNN's shape in miniature: Conv, Conv, MaxPool, Flatten, Linear, Linear."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.view = view
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        x = x.view(x.size(0), -1) if self.view else torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class MLP(nn.Module):
    """Linear layers on a 3-D input export as MatMul + Add; GELU as Div/Erf/Add/Mul/Mul."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        z = torch.relu(self.conv2(y)) + y
        return self.fc(torch.relu(self.conv3(z)).mean((2, 3)))


def zero_odd_outputs(*layers: nn.Module) -> None:
    """Make every odd output channel/neuron contribute exactly nothing."""
    with torch.no_grad():
        for layer in layers:
            layer.weight[1::2] = 0
            layer.bias[1::2] = 0


def bn_model(zero_odd: bool) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm (transB)."""
    w = RNG.normal(size=(8, 1, 3, 3)).astype(np.float32)
    b = RNG.normal(size=8).astype(np.float32)
    scale = RNG.uniform(0.5, 2, 8).astype(np.float32)
    beta = RNG.normal(size=8).astype(np.float32)
    mean = RNG.normal(size=8).astype(np.float32)
    var = RNG.uniform(0.5, 2, 8).astype(np.float32)
    if zero_odd:  # BN(0) = 0 for these channels too
        w[1::2] = b[1::2] = beta[1::2] = mean[1::2] = 0
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (w, "w"),
            (b, "b"),
            (scale, "scale"),
            (beta, "beta"),
            (mean, "mean"),
            (var, "var"),
            (RNG.normal(size=(4, 8)).astype(np.float32), "fc_w"),
            (RNG.normal(size=4).astype(np.float32), "fc_b"),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["n"], name="bn"
        ),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def blocked_model(tail: str) -> onnx.ModelProto:
    """Conv -> Relu -> (depthwise Conv | Concat with itself) -> GAP -> Flatten -> Gemm."""
    arrays = {
        "w1": RNG.normal(size=(8, 1, 3, 3)),
        "dw": RNG.normal(size=(8, 1, 3, 3)),
        "fc_w": RNG.normal(size=(8 if tail == "depthwise" else 16, 4)),
    }
    if tail == "depthwise":
        mid = helper.make_node("Conv", ["r", "dw"], ["t"], name="dw", group=8, pads=[1] * 4)
    else:
        mid = helper.make_node("Concat", ["r", "r"], ["t"], name="concat", axis=1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        mid,
        helper.make_node("GlobalAveragePool", ["t"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        tail,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array, name)
    )


def constants_model() -> onnx.ModelProto:
    """An MLP whose weights are Constant nodes, as some exporters write them."""
    nodes = [
        constant("w1", RNG.normal(size=(16, 32)).astype(np.float32)),
        constant("b1", RNG.normal(size=32).astype(np.float32)),
        constant("w2", RNG.normal(size=(32, 8)).astype(np.float32)),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_model() -> onnx.ModelProto:
    """A main-graph MatMul whose output both branches of an If read, each with its own weight."""

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(RNG.normal(size=(32, 8)).astype(np.float32), f"w_{name}")
        return helper.make_graph(
            [helper.make_node("MatMul", ["r", f"w_{name}"], [f"y_{name}"], name=f"mm_{name}")],
            name,
            [],
            [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["batch", 8])],
            [w],
        )

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                name="if",
                then_branch=branch("then"),
                else_branch=branch("else"),
            ),
        ],
        "with_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(RNG.normal(size=(16, 32)).astype(np.float32), "w0")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------------------
# Helpers


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def prune(model: onnx.ModelProto, **config: object):
    return Prune(PruneConfig(**config)).run(model, None)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_of(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return weights(model)[node.input[index]]


def sparsity(a: np.ndarray) -> float:
    return 1 - np.count_nonzero(a) / a.size


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    torch.manual_seed(0)
    return export(CNN(), torch.randn(2, 1, 8, 8))


LAYERS = ["/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"]
X_CNN = RNG.normal(size=(3, 1, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------
# Magnitude


def test_magnitude_layer_scope_reaches_sparsity_in_every_layer(cnn):
    before = cnn.SerializeToString()
    out = prune(cnn, method="magnitude", sparsity=0.6, scope="layer")
    assert cnn.SerializeToString() == before  # the input model is never mutated
    for name in LAYERS:
        assert sparsity(weight_of(out.model, name)) == pytest.approx(0.6, abs=0.01), name
        # biases are not weights to prune
        assert np.array_equal(weight_of(out.model, name, 2), weight_of(cnn, name, 2))
    assert any("magnitude:" in n and "layer scope" in n for n in out.notes)
    onnx.checker.check_model(out.model, full_check=True)
    assert run(out.model, input=X_CNN).shape == (3, 10)


def test_magnitude_global_scope_uses_one_threshold(cnn):
    out = prune(cnn, method="magnitude", sparsity=0.5, scope="global", criterion="l2")
    pruned = [weight_of(out.model, n) for n in LAYERS]
    total = sum(a.size for a in pruned)
    zeros = sum(a.size - np.count_nonzero(a) for a in pruned)
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    # One threshold: every surviving weight is at least as large as every zeroed one.
    originals = [weight_of(cnn, n) for n in LAYERS]
    kept = min(np.abs(o[p != 0]).min() for o, p in zip(originals, pruned, strict=True))
    dropped = max(np.abs(o[p == 0]).max() for o, p in zip(originals, pruned, strict=True))
    assert dropped <= kept
    assert len({round(sparsity(a), 2) for a in pruned}) > 1  # layers differ
    assert any(n.startswith("per layer:") for n in out.notes)


def test_magnitude_respects_exclude_nodes(cnn):
    out = prune(cnn, method="magnitude", sparsity=0.5, exclude_nodes=["/fc1/Gemm"])
    assert np.array_equal(weight_of(out.model, "/fc1/Gemm"), weight_of(cnn, "/fc1/Gemm"))
    assert sparsity(weight_of(out.model, "/conv2/Conv")) == pytest.approx(0.5, abs=0.01)


def test_unknown_exclude_node_is_bad_input(cnn):
    with pytest.raises(BadInput, match=r"'/fc1/Gem' \(did you mean '/fc1/Gemm'\?\)"):
        prune(cnn, method="magnitude", sparsity=0.5, exclude_nodes=["/fc1/Gem"])


def test_tiny_weights_are_skipped_and_model_left_unchanged():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((2, 4), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = prune(model, method="magnitude", sparsity=0.5)
    assert out.model is model
    assert any("under 16 elements" in n and "mm" in n for n in out.notes)


def test_shared_weight_is_pruned_once():
    w = np.arange(1, 65, dtype=np.float32).reshape(8, 8)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = prune(model, method="magnitude", sparsity=0.25)
    pruned = weights(out.model)["w"]
    assert np.count_nonzero(pruned == 0) == 16
    assert (pruned[:2] == 0).all() and (pruned[2:] != 0).all()  # the 16 smallest
    assert any("of 64 weights" in n for n in out.notes)


def test_constant_node_weights_are_pruned():
    model = constants_model()
    out = prune(model, method="magnitude", sparsity=0.5)
    assert any("3 Constant nodes" in n for n in out.notes)
    assert sparsity(weights(out.model)["w1"]) == pytest.approx(0.5, abs=0.01)
    assert sparsity(weights(out.model)["w2"]) == pytest.approx(0.5, abs=0.01)

    out = prune(model, method="structured", sparsity=0.5)
    assert weights(out.model)["w1"].shape == (16, 16)
    assert weights(out.model)["b1"].shape == (16,)
    assert weights(out.model)["w2"].shape == (16, 8)
    assert run(out.model, x=RNG.normal(size=(2, 16)).astype(np.float32)).shape == (2, 8)


def test_subgraph_weights_are_reported_not_pruned():
    model = if_model()
    out = prune(model, method="magnitude", sparsity=0.5)
    assert any("512 weight elements inside If/Loop/Scan" in n for n in out.notes)
    assert sparsity(weights(out.model)["w0"]) == pytest.approx(0.5, abs=0.01)
    then = next(a.g for a in out.model.graph.node[2].attribute if a.name == "then_branch")
    assert np.count_nonzero(numpy_helper.to_array(then.initializer[0])) == 32 * 8

    # Structured: mm0's output is read inside the branches, which are not traced.
    out = prune(model, method="structured", sparsity=0.5)
    assert out.model is model
    assert any("skipped mm0" in n and "If/Loop/Scan body" in n for n in out.notes)


# ---------------------------------------------------------------------------
# Structured


def test_structured_shrinks_layers_and_consumers(cnn):
    out = prune(cnn, method="structured", sparsity=0.5)
    m = out.model
    assert weight_of(m, "/conv1/Conv").shape == (4, 1, 3, 3)
    assert weight_of(m, "/conv1/Conv", 2).shape == (4,)
    assert weight_of(m, "/conv2/Conv").shape == (8, 4, 3, 3)
    assert weight_of(m, "/fc1/Gemm").shape == (16, 128)  # K: 16*4*4 -> 8*4*4 through Flatten
    assert weight_of(m, "/fc2/Gemm").shape == (10, 16)  # the output layer keeps its 10
    assert "removed 4/8 channels of /conv1/Conv" in out.notes
    assert "removed 16/32 neurons of /fc1/Gemm" in out.notes
    assert "skipped /fc2/Gemm: its output is a graph output" in out.notes
    assert weight_stats(m)[0] < weight_stats(cnn)[0] / 2.5
    assert len(m.SerializeToString()) < len(cnn.SerializeToString()) / 2.5
    assert not m.graph.value_info
    onnx.checker.check_model(m, full_check=True)
    assert run(m, input=X_CNN).shape == (3, 10)


def test_structured_records_which_source_channels_each_conv_keeps(cnn):
    """Pruning twice composes the record, so it always indexes the source's channels;
    a conv that lost input channels is recorded as not to be matched; the artifact
    `compress` writes carries no record."""
    from edgeslim.compressor import channel_map

    once = prune(cnn, method="structured", sparsity=0.5).model
    twice = prune(once, method="structured", sparsity=0.5).model
    conv1 = next(n for n in twice.graph.node if n.name == "/conv1/Conv").output[0]
    conv2 = next(n for n in twice.graph.node if n.name == "/conv2/Conv").output[0]
    kept = channel_map.read(twice)
    assert len(kept[conv1]) == 2 and len(kept[conv2]) == 0
    # conv1 reads the image, so its kept filters are the source's at the recorded rows.
    np.testing.assert_array_equal(
        weight_of(twice, "/conv1/Conv"), weight_of(cnn, "/conv1/Conv")[kept[conv1]]
    )
    stripped = channel_map.without(twice)
    assert channel_map.read(stripped) == {} and channel_map.read(twice)[conv1].size == 2
    assert channel_map.without(cnn) is cnn


class GatedCNN(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act = act
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize(
    ("act", "opset", "matched"),
    [
        (nn.ReLU(), 17, False),
        (nn.Hardswish(), 17, True),  # HardSwish
        (nn.Hardswish(), 13, True),  # x * HardSigmoid(x)
        (nn.SiLU(), 13, True),  # x * Sigmoid(x)
        (nn.GELU(), 17, True),  # Div -> Erf -> Add -> Mul -> Mul
    ],
    ids=["relu", "hardswish", "hardswish-opset13", "silu", "gelu"],
)
def test_a_conv_that_lost_inputs_is_matched_only_before_a_scale_sensitive_activation(
    act: nn.Module, opset: int, matched: bool
):
    """ReLU passes any scale through; hard-swish, sigmoid gates and GELU do not, so
    distillation gives a conv that feeds one its source statistics back (channel_map)."""
    from edgeslim.compressor import channel_map

    torch.manual_seed(0)
    module = GatedCNN(act).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.randn(1, 1, 8, 8),),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
    )
    model = onnx.load_from_string(buf.getvalue())
    out = prune(model, method="structured", sparsity=0.5).model
    conv1, conv2 = (n.output[0] for n in out.graph.node if n.op_type == "Conv")
    kept = channel_map.read(out)
    assert len(kept[conv1]) == 4  # reads the image: always matched
    assert len(kept[conv2]) == (8 if matched else 0)


@pytest.mark.parametrize("view", [False, True], ids=["flatten", "view"])
def test_structured_removing_dead_channels_keeps_outputs_exact(view):
    torch.manual_seed(1)
    module = CNN(view=view)
    zero_odd_outputs(module.conv1, module.conv2, module.fc1)
    model = export(module, torch.randn(2, 1, 8, 8))
    if view:  # x.view(x.size(0), -1) exports as Shape/Gather/Unsqueeze/Concat/Reshape
        assert any(n.op_type == "Reshape" for n in model.graph.node)
    out = prune(model, method="structured", sparsity=0.5, criterion="l2")
    assert weight_of(out.model, "/fc1/Gemm").shape == (16, 128)
    np.testing.assert_allclose(run(out.model, input=X_CNN), run(model, input=X_CNN), atol=1e-5)


def test_structured_sparsity_zero_leaves_model_unchanged(cnn):
    out = prune(cnn, method="structured", sparsity=0.0)
    assert out.model is cnn
    assert any("removes no channel" in n for n in out.notes)
    out = prune(cnn, method="structured", sparsity=0.01)  # rounds to 0 channels everywhere
    assert out.model is cnn
    assert "structured: sparsity 1.0% removes no channel" in out.notes


@pytest.mark.parametrize("tail", ["depthwise", "concat"])
def test_structured_follows_depthwise_and_concat(tail):
    model = blocked_model(tail)
    w = weights(model)["w1"].copy()
    w[1::2] = 0  # dead channels: removing them must not change the output
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    out = prune(model, method="structured", sparsity=0.5)
    pruned = weights(out.model)
    assert pruned["w1"].shape == (4, 1, 3, 3)
    if tail == "depthwise":  # the depthwise filters go with their input channels
        assert pruned["dw"].shape == (4, 1, 3, 3)
        dw = next(n for n in out.model.graph.node if n.name == "dw")
        assert helper.get_attribute_value(dw.attribute[0]) == 4  # group follows
        assert "removed 4/8 channels of conv1, dw" in out.notes
    else:  # both copies of each channel in the Concat are removed
        assert pruned["fc_w"].shape == (8, 4)
    assert "skipped fc: its output is a graph output" in out.notes
    onnx.checker.check_model(out.model, full_check=True)
    x = RNG.normal(size=(2, 1, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(out.model, x=x), run(model, x=x), atol=1e-5)


def test_structured_batchnorm_is_sliced_exactly():
    model = bn_model(zero_odd=True)
    out = prune(model, method="structured", sparsity=0.5)
    w = weights(out.model)
    assert w["w"].shape == (4, 1, 3, 3)
    assert all(w[n].shape == (4,) for n in ("scale", "beta", "mean", "var"))
    assert w["fc_w"].shape == (4, 4)  # transB: [N, K], K sliced
    x = RNG.normal(size=(2, 1, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(out.model, x=x), run(model, x=x), atol=1e-5)


def test_structured_matmul_mlp_through_gelu_is_exact():
    torch.manual_seed(2)
    module = MLP()
    zero_odd_outputs(module.fc1, module.fc2)
    model = export(module, torch.randn(2, 3, 12))
    assert {"MatMul", "Erf"} <= {n.op_type for n in model.graph.node}
    out = prune(model, method="structured", sparsity=0.5)
    assert weight_of(out.model, "/fc1/MatMul").shape == (12, 16)
    assert weight_of(out.model, "/fc2/MatMul").shape == (16, 12)
    assert weight_of(out.model, "/fc3/MatMul").shape == (12, 5)
    x = RNG.normal(size=(4, 3, 12)).astype(np.float32)
    np.testing.assert_allclose(run(out.model, input=x), run(model, input=x), atol=1e-5)


def test_structured_prunes_a_residual_stream_as_one_group():
    torch.manual_seed(3)
    module = Residual()
    zero_odd_outputs(module.conv1, module.conv2, module.conv3)
    model = export(module, torch.randn(1, 3, 6, 6))
    out = prune(model, method="structured", sparsity=0.5)
    # conv1 and conv2 write the same stream (conv2(y) + y): one group, same channels.
    assert "removed 4/8 channels of /conv1/Conv, /conv2/Conv" in out.notes
    assert weight_of(out.model, "/conv1/Conv").shape == (4, 3, 3, 3)
    assert weight_of(out.model, "/conv2/Conv").shape == (4, 4, 3, 3)
    assert weight_of(out.model, "/conv3/Conv").shape == (8, 4, 3, 3)
    assert weight_of(out.model, "/fc/Gemm").shape == (4, 8)
    x = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(out.model, input=x), run(model, input=x), atol=1e-5)


def test_structured_excluded_layers_and_their_inputs_are_untouched(cnn):
    out = prune(cnn, method="structured", sparsity=0.5, exclude_nodes=["/conv2/Conv"])
    assert np.array_equal(weight_of(out.model, "/conv2/Conv"), weight_of(cnn, "/conv2/Conv"))
    assert "kept /conv2/Conv: excluded" in out.notes
    assert any("/conv1/Conv" in n and "is excluded" in n for n in out.notes)
    assert weight_of(out.model, "/fc1/Gemm").shape == (16, 256)
    assert run(out.model, input=X_CNN).shape == (3, 10)


def test_calibrated_criteria_need_structured_pruning_and_data(cnn):
    with pytest.raises(ValueError, match="criterion taylor ranks channels: it needs method"):
        PruneConfig(method="magnitude", sparsity=0.5, criterion="taylor")
    with pytest.raises(BadInput, match=r"prune\.criterion activation needs calibration data"):
        prune(cnn, method="structured", sparsity=0.5, criterion="activation")


def test_constant_folding_never_builds_huge_tensors():
    """A ConstantOfShape asking for 10^12 elements is left in the graph, not evaluated."""
    from edgeslim.compressor.prune_graph import fold_integer_constants

    huge = numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "huge")
    small = numpy_helper.from_array(np.array([2, 3], np.int64), "small")
    one = numpy_helper.from_array(np.array([1], np.int64))
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["huge"], ["a"], name="big", value=one),
            helper.make_node("ConstantOfShape", ["small"], ["b"], name="ok", value=one),
            helper.make_node("Shape", ["a"], ["sa"]),
            helper.make_node("Shape", ["b"], ["sb"]),
            helper.make_node("Concat", ["sa", "sb"], ["y"], axis=0),
        ],
        "fold",
        [],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [4])],
        [huge, small],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fold_integer_constants(model) == 1
    assert [n.name for n in model.graph.node if n.op_type == "ConstantOfShape"] == ["big"]
