"""Structured pruning by dependency groups on real architectures.

torchvision's mobilenet_v3_small (depthwise convs, squeeze-excite, residual
adds, hard-swish) and resnet18 (residual streams, downsample branches), and a
small BERT from a transformers config (attention heads, FFN, LayerNorm),
untrained, exported at opsets 11, 13 and 17 and once with Constant-node
weights. The structure is what is tested: how many layers a prunable group
reaches, that the pruned graph is valid and runs, that it has the parameter
count the plan predicted, and, with the channels the pruner removes zeroed in
the source beforehand, that source and pruned model agree exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from edgeslim.api.spec import PruneConfig
from edgeslim.compressor import graph as g
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.prune import Prune, plan_structured
from edgeslim.compressor.steps import StepContext
from tests.archs import export

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

RNG = np.random.default_rng(0)


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]


def build(arch: str, opset: int) -> Case:
    torch.manual_seed(0)
    if arch == "bert":
        config = transformers.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
            max_position_embeddings=32,
            num_labels=3,
        )
        # The sdpa kernel only exports from opset 14 on.
        config._attn_implementation = "eager" if opset < 14 else "sdpa"
        module = transformers.BertForSequenceClassification(config)
        ids = torch.randint(0, 100, (2, 8))
        model = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], opset)
        mask = np.ones((3, 8), np.int64)
        mask[0, 5:] = 0  # padding, so the attention mask path is exercised
        feeds = {"input_ids": RNG.integers(0, 100, (3, 8)), "attention_mask": mask}
    else:
        module = getattr(torchvision.models, arch)(num_classes=10, weights=None)
        model = export(module, (torch.randn(1, 3, 64, 64),), ["input"], opset)
        feeds = {"input": RNG.normal(size=(2, 3, 64, 64)).astype(np.float32)}
    g.constants_to_initializers(model)
    return Case(model, feeds)


def to_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every float initializer written as a Constant node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    floats = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    nodes = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in floats
    ]
    names = {t.name for t in floats}
    keep = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    rest = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + rest)
    return out


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def zero_removed(model: onnx.ModelProto, config: PruneConfig) -> onnx.ModelProto:
    """A copy of `model` in which the units the pruner will remove write nothing:
    their output slices and biases in every producing layer are zero."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    plan = plan_structured(work, config, set(), [])
    assert plan is not None
    gone = plan.surgery.gone
    arrays: dict[str, np.ndarray] = {}
    for mem in plan.groups.d.members.values():
        if mem.role == "in" or mem.node.op_type == "Div":
            continue  # inputs of the next layer, and divisors, stay as they are
        mask = gone[mem.ids]
        if not mask.any():
            continue
        name = mem.node.input[mem.index]
        arr = arrays.setdefault(name, numpy_helper.to_array(plan.groups.d.m.inits[name]).copy())
        index = [slice(None)] * arr.ndim
        index[mem.axis] = np.flatnonzero(mask)
        arr[tuple(index)] = 0
    for name, arr in arrays.items():
        g.replace_initializer(work.graph, name, arr)
    return work


ARCHS = {
    # arch: (weight layers, reached by a prunable group, minimum parameter ratio at 0.5)
    "mobilenet_v3_small": (54, 54, 1.8),
    "resnet18": (21, 21, 1.8),
    "bert": (14, 14, 1.5),
}
# Every architecture at every opset; one of them with Constant-node weights.
CASES = [
    pytest.param(
        arch, opset, opset == constants, id=f"{arch}-{opset}" + "-constants" * (opset == constants)
    )
    for arch, constants in [("mobilenet_v3_small", 11), ("resnet18", 17), ("bert", 13)]
    for opset in (11, 13, 17)
]


@pytest.mark.parametrize(("arch", "opset", "constants"), CASES)
def test_groups_prune_real_architectures_exactly(arch: str, opset: int, constants: bool):
    case = build(arch, opset)
    layers, reached, ratio = ARCHS[arch]
    config = PruneConfig(sparsity=0.5)

    work = onnx.ModelProto()
    work.CopyFrom(case.model)
    plan = plan_structured(work, config, set(), [])
    assert plan is not None
    assert len(plan.groups.d.layers) == layers
    assert len(plan.groups.reached_layers()) == reached  # >= 90% is the goal

    source = zero_removed(case.model, config)
    if constants:
        source = to_constant_nodes(source)
    out = Prune(config).run(source, None)
    pruned = out.model
    onnx.checker.check_model(pruned, full_check=True)
    after, _ = g.weight_stats(pruned)
    assert after == plan.predicted
    assert plan.before / after >= ratio, out.notes
    summary = next(n for n in out.notes if n.startswith("structured:"))
    assert summary.startswith(f"structured: {layers}/{layers} layers pruned"), summary

    expected = run(source, case.feeds)
    # The zeroed channels mattered before: the comparison below is not vacuous.
    before = run(case.model, case.feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(run(pruned, case.feeds), expected, rtol=1e-4, atol=1e-5)


def test_bert_heads_are_removed_whole_and_hidden_width_is_kept():
    case = build("bert", 17)
    out = Prune(PruneConfig(sparsity=0.5)).run(case.model, None)
    heads = [n for n in out.notes if "heads of" in n]
    assert len(heads) == 2 and all(n.startswith("removed 2/4 heads of") for n in heads), heads
    assert any("intermediate/dense/MatMul" in n and "64/128 neurons" in n for n in out.notes)
    # The residual stream under LayerNormalization is never cut.
    assert any("output/dense/MatMul" in n and "not tracked" in n for n in out.notes)
    shapes = {t.name: tuple(t.dims) for t in out.model.graph.initializer}
    node = {n.name: n for n in out.model.graph.node}
    q = node["/bert/encoder/layer.0/attention/self/query/MatMul"].input[1]
    o = node["/bert/encoder/layer.0/attention/output/dense/MatMul"].input[1]
    assert shapes[q] == (64, 32) and shapes[o] == (32, 64)
    assert run(out.model, case.feeds).shape == (3, 3)


def test_global_scope_keeps_min_channels_in_every_group():
    case = build("mobilenet_v3_small", 17)
    work = onnx.ModelProto()
    work.CopyFrom(case.model)
    config = PruneConfig(sparsity=0.7, scope="global", min_channels=4)
    plan = plan_structured(work, config, set(), [])
    assert plan is not None
    removed = sum(len(u) for u in plan.chosen.values())
    total = sum(len(grp.units) for grp in plan.groups.prunable)
    assert removed == round(0.7 * total)
    for grp in plan.groups.prunable:
        assert len(grp.units) - len(plan.chosen.get(grp.root, [])) >= min(4, len(grp.units))
    shares = {len(plan.chosen.get(grp.root, [])) / len(grp.units) for grp in plan.groups.prunable}
    assert len(shares) > 2  # groups lose different shares, unlike layer scope
    out = Prune(config).run(case.model, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert run(out.model, case.feeds).shape == (2, 10)


def calibration_context(model: onnx.ModelProto, data: Dataset) -> StepContext:
    return StepContext(
        source=model,
        workdir=None,  # type: ignore[arg-type]
        load_dataset=lambda uri, sha, model: data,
        load_model=lambda uri, sha: model,
        evaluation_dataset=data.source,
    )


class DeadChannels(torch.nn.Module):
    """The odd channels of both convs have the largest weights but a bias that keeps
    them below zero, so after the ReLU they are never active."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight[1::2] *= 5
                conv.bias[1::2] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("criterion", ["l1", "activation", "taylor"])
def test_activation_importance_removes_channels_that_are_never_active(criterion: str):
    """Wanda-style |W| * ||X||: a channel that is zero on the calibration data scores
    0 whatever its weights, so it goes first, and removing it changes nothing.
    By weight norm alone the same channels look the most important."""
    torch.manual_seed(0)
    module = DeadChannels()
    model = export(module, (torch.randn(1, 3, 8, 8),), ["input"], 17)
    data = Dataset({"input": RNG.normal(size=(16, 3, 8, 8)).astype(np.float32)}, None, "calib")
    config = PruneConfig(sparsity=0.5, criterion=criterion, calibration_samples=8)
    out = Prune(config).run(model, calibration_context(model, data))
    w1 = next(t for t in out.model.graph.initializer if t.name == "conv1.weight")
    kept = numpy_helper.to_array(w1)
    source = module.conv1.weight.detach().numpy()
    feeds = {"input": RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)}
    if criterion != "l1":
        assert f"{criterion} importance from 8 samples of calib" in out.notes
        np.testing.assert_array_equal(kept, source[0::2])
        np.testing.assert_allclose(run(out.model, feeds), run(model, feeds), atol=1e-5)
    else:
        np.testing.assert_array_equal(kept, source[1::2])


@pytest.mark.parametrize(
    ("arch", "criterion"),
    [
        ("resnet18", "activation"),
        ("mobilenet_v3_small", "taylor"),
        ("bert", "activation"),
        ("bert", "taylor"),
    ],
)
def test_calibrated_importance_on_a_real_architecture(arch: str, criterion: str):
    case = build(arch, 17)
    data = Dataset({k: np.concatenate([v] * 4) for k, v in case.feeds.items()}, None, "calib")
    config = PruneConfig(sparsity=0.5, criterion=criterion, calibration_samples=4)
    out = Prune(config).run(case.model, calibration_context(case.model, data))
    assert f"{criterion} importance from 4 samples of calib" in out.notes
    onnx.checker.check_model(out.model, full_check=True)
    ratio = g.weight_stats(case.model)[0] / g.weight_stats(out.model)[0]
    assert ratio >= ARCHS[arch][2]
    assert run(out.model, case.feeds).shape == run(case.model, case.feeds).shape


class DetectionHead(torch.nn.Module):
    """Concat of two branches, Split, Slice, Pad, Resize, InstanceNorm, PRelu and a
    ConvTranspose: the layout ops a detection or segmentation head is made of."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.norm = nn.InstanceNorm2d(16, affine=True)
        self.prelu = nn.PReLU(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        s = torch.relu(self.stem(x))
        y = self.prelu(self.norm(torch.cat([self.a(s), self.b(s)], 1)))
        p, q = torch.split(y, [8, 8], dim=1)
        y = torch.cat([p + q, y[:, :8]], 1)  # p + q couples a's and b's channels
        y = f.interpolate(f.pad(y, (1, 1, 1, 1)), scale_factor=2.0, mode="nearest")
        skip = f.interpolate(s[:, 4:12], scale_factor=4.0, mode="nearest")
        return self.out(torch.cat([self.up(y)[:, :, 4:-4, 4:-4], skip], 1))


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_layout_ops_of_a_detection_head_are_followed_exactly(opset: int):
    torch.manual_seed(0)
    with torch.no_grad():
        module = DetectionHead()
        module.prelu.weight.uniform_(0.1, 0.3)
    model = export(module, (torch.randn(1, 3, 8, 8),), ["input"], opset)
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    notes: list[str] = []
    plan = plan_structured(work, config, set(), notes)
    assert plan is not None
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 5, notes
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 4/8 channels of /a/Conv, /b/Conv") for n in out.notes)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"input": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(out.model, feeds), run(source, feeds), rtol=1e-4, atol=1e-5)


class GroupedNet(torch.nn.Module):
    """A grouped Conv (ResNeXt, RegNet) and a depthwise Conv with channel multiplier 2."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(24, 48, 3, padding=1, groups=24)
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.grouped(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.depthwise(y)).mean((2, 3)))


def test_grouped_and_multiplier_depthwise_convs_keep_their_groups_balanced():
    torch.manual_seed(0)
    model = export(GroupedNet(), (torch.randn(1, 3, 8, 8),), ["input"], 13)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    shapes = {t.name: tuple(t.dims) for t in out.model.graph.initializer}
    # stem: input k of each of the 4 groups is one unit (4 units of 4 channels): 2 go.
    assert shapes["stem.weight"] == (8, 3, 3, 3)
    # grouped: 6 outputs per group, 3 go in every group; its in-slices 4 -> 2.
    assert shapes["grouped.weight"] == (12, 2, 3, 3)
    # depthwise x2: each removed input channel takes its 2 filters with it.
    assert shapes["depthwise.weight"] == (24, 1, 3, 3)
    group = {
        n.name: next(a.i for a in n.attribute if a.name == "group")
        for n in out.model.graph.node
        if n.op_type == "Conv"
    }
    assert group == {"/stem/Conv": 1, "/grouped/Conv": 4, "/depthwise/Conv": 12}
    onnx.checker.check_model(out.model, full_check=True)
    feeds = {"input": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(out.model, feeds), run(source, feeds), rtol=1e-4, atol=1e-5)


class Attention(torch.nn.Module):
    """Self-attention written with explicit head counts in its reshapes
    (view(b, s, 4, 8) and reshape(b, s, 32)), unlike transformers' -1."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, 4, 8).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
        return self.o((a @ v).transpose(1, 2).reshape(b, s, 32))


@pytest.mark.parametrize("dynamic", [False, True], ids=["constant-shapes", "computed-shapes"])
def test_head_count_constants_in_reshapes_follow_the_pruned_heads(dynamic: bool):
    torch.manual_seed(0)
    module = Attention().eval()
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.randn(2, 5, 32),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}} if dynamic else None,
    )
    model = onnx.load_from_string(buf.getvalue())
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(
        n.startswith("removed 2/4 heads of /q/MatMul, /k/MatMul, /v/MatMul") for n in out.notes
    )
    shapes = {t.name: tuple(t.dims) for t in out.model.graph.initializer}
    node = {n.name: n for n in out.model.graph.node}
    assert shapes[node["/q/MatMul"].input[1]] == (32, 16)
    assert shapes[node["/o/MatMul"].input[1]] == (16, 32)
    onnx.checker.check_model(out.model, full_check=True)
    feeds = {"x": RNG.normal(size=(2, 5, 32)).astype(np.float32)}
    np.testing.assert_allclose(run(out.model, feeds), run(source, feeds), rtol=1e-4, atol=1e-5)
