"""Structured pruning by dependency groups on real architectures.

torchvision's mobilenet_v3_small (depthwise convs, squeeze-excite, residual
adds, hard-swish) and resnet18 (residual streams, downsample branches), and a
small BERT from a transformers config (attention heads, FFN, LayerNorm),
untrained, exported at opsets 11, 13 and 17 and once with Constant-node
weights. The structure is what is tested: how many layers a prunable group
reaches, that the pruned graph is valid and runs, that it has the parameter
count the plan predicted, and, with the channels the pruner removes zeroed in
the source beforehand, that source and pruned model agree exactly. BERT's
hidden width is the exception (LayerNorm statistics change when channels go):
there the pruned graph is compared with a narrower BERT built in torch.
Families it was not tuned on follow, after `simplify` as a user would run it:
ShuffleNetV2 (channel shuffles), torchvision's ViT (nn.MultiheadAttention) and
a small Swin (windows, packed Q/K/V, relative position bias, patch merging).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from edgeslim.api.spec import PruneConfig, SimplifyConfig
from edgeslim.compressor import graph as g
from edgeslim.compressor import prune_importance
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.prune import Prune, plan_structured
from edgeslim.compressor.simplify import Simplify, slim
from edgeslim.compressor.steps import StepContext
from tests.archs import (
    PixelLogits,
    YoloV8n,
    export,
    export_dynamo,
    phone_vision,
    tiny_bert,
    tiny_deberta_v3,
    tiny_llama,
)

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("transformers")

RNG = np.random.default_rng(0)


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]


def build(arch: str, opset: int) -> Case:
    torch.manual_seed(0)
    if arch == "bert":
        module = tiny_bert(opset)
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


def planned(model: onnx.ModelProto, config: PruneConfig, notes: list[str]):
    """The structured-pruning plan for a copy of `model` (planning edits the graph it reads)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    plan = plan_structured(work, config, set(config.exclude_nodes), notes)
    assert plan is not None, notes
    return plan


def zero_removed(model: onnx.ModelProto, config: PruneConfig) -> onnx.ModelProto:
    """A copy of `model` in which the units the pruner will remove write nothing:
    their output slices and biases in every producing layer are zero."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    plan = plan_structured(work, config, set(config.exclude_nodes), [])
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
        if not np.issubdtype(arr.dtype, np.floating):
            continue  # a shuffle's channel indices: cut, never zeroed
        index = [slice(None)] * arr.ndim
        index[mem.axis] = np.flatnonzero(mask)
        arr[tuple(index)] = 0
    for name, arr in arrays.items():
        g.replace_initializer(work.graph, name, arr)
    return work


def padded_text(vocab: int = 100) -> dict[str, np.ndarray]:
    """Three sequences of 8 tokens, the first padded after 5 (the mask path runs)."""
    mask = np.ones((3, 8), np.int64)
    mask[0, 5:] = 0
    return {"input_ids": RNG.integers(0, vocab, (3, 8)), "attention_mask": mask}


def assert_exact(
    pruned: onnx.ModelProto,
    source: onnx.ModelProto,
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
) -> None:
    """`pruned` computes what `source` (`model` with the removed units zeroed) does,
    and that differs from `model`, so the zeroed units mattered."""
    expected, before = run(source, feeds), run(model, feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(run(pruned, feeds), expected, rtol=1e-4, atol=1e-5)


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


# Excluding it keeps BERT's hidden width, whose pruning is not exact (see below).
WORD_EMBEDDINGS = "/bert/embeddings/word_embeddings/Gather"


@pytest.mark.parametrize(("arch", "opset", "constants"), CASES)
def test_groups_prune_real_architectures_exactly(arch: str, opset: int, constants: bool):
    case = build(arch, opset)
    layers, reached, ratio = ARCHS[arch]
    config = PruneConfig(sparsity=0.5, exclude_nodes=[WORD_EMBEDDINGS] if arch == "bert" else [])

    work = onnx.ModelProto()
    work.CopyFrom(case.model)
    plan = plan_structured(work, config, set(config.exclude_nodes), [])
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


@pytest.mark.parametrize(("opset", "constants"), [(11, True), (13, False), (17, False)])
def test_yolov8_style_detector_prunes_c2f_sppf_and_the_neck_exactly(opset: int, constants: bool):
    """The edge detector people ship most: C2f's channel split and concat of every
    bottleneck, SPPF's pooled copies, the neck's upsampled concats and the decoupled
    head all prune as groups. Only the head's output convs keep their outputs (the
    box bins are decoded by a Reshape and softmax, the classes are the output), and
    the fixed DFL conv has nothing to prune."""
    torch.manual_seed(0)
    module = YoloV8n()
    with torch.no_grad():  # an untrained net's output hardly depends on its channels
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_(0.0, 0.5)
    raw = export(module, (torch.randn(1, 3, 96, 96),), ["images"], opset)
    model = slim(raw)  # what the prune step folds the export's computed Reshape targets to
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    assert (len(plan.groups.d.layers), len(plan.groups.reached_layers())) == (64, 63)
    source = zero_removed(model, config)
    out = Prune(config).run(to_constant_nodes(source) if constants else source, None)
    onnx.checker.check_model(out.model, full_check=True)
    summary = next(n for n in out.notes if n.startswith("structured:"))
    assert summary.startswith("structured: 63/64 layers pruned"), out.notes
    assert g.weight_stats(out.model)[0] == plan.predicted
    assert plan.before / plan.predicted >= 3.3  # 3,002,864 -> 891,896
    images = np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype(np.float32)
    assert_exact(out.model, source, model, {"images": images})


def narrow_bert(model: onnx.ModelProto, hidden: int, heads: int, ffn: int, opset: int):
    """A transformers BERT of the given widths holding the weights of the pruned `model`
    (initializer names survive pruning; MatMul weights are found by node name)."""
    module = tiny_bert(opset, hidden=hidden, heads=heads, ffn=ffn).eval()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matmul = {
        n.name: inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits
    }
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in inits:
                value = inits[name]
            else:  # a Linear exported as MatMul with its weight transposed
                path = name.removesuffix(".weight").replace(".", "/")
                value = matmul["/" + re.sub(r"layer/(\d+)", r"layer.\1", path) + "/MatMul"].T
            assert tuple(value.shape) == tuple(param.shape), name
            param.copy_(torch.from_numpy(np.array(value)))
    return module


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_bert_hidden_width_is_one_group_that_composes_with_heads(opset: int):
    """Embeddings, every LayerNorm (written out as ReduceMean/Sub/Pow/Sqrt/Div before
    opset 17), the residual adds, Q/K/V and FFN input rows, attention-output and FFN
    output columns and the pooler's input are cut together; heads go on top. The
    result computes exactly what a BERT of hidden width 32 with the kept weights
    computes (LayerNorm now over 32 channels), not the source's function."""
    case = build("bert", opset)
    config = PruneConfig(sparsity=0.5)
    work = onnx.ModelProto()
    work.CopyFrom(case.model)
    plan = plan_structured(work, config, set(), [])
    assert plan is not None
    out = Prune(config).run(case.model, None)
    hidden = [n for n in out.notes if n.startswith("removed 32/64 hidden channels of")]
    assert len(hidden) == 1 and WORD_EMBEDDINGS in hidden[0], out.notes
    assert any("normalizes over the channels of" in n and "not those" in n for n in out.notes)
    heads = [n for n in out.notes if "heads of" in n]
    assert len(heads) == 2 and all(n.startswith("removed 2/4 heads of") for n in heads), heads
    assert any("intermediate/dense/MatMul" in n and "64/128 neurons" in n for n in out.notes)
    assert not [n for n in out.notes if n.startswith("skipped") and "classifier" not in n]

    onnx.checker.check_model(out.model, full_check=True)
    after, _ = g.weight_stats(out.model)
    assert after == plan.predicted
    assert plan.before / after >= 3.5  # heads and FFN alone gave 1.9x
    shapes = {t.name: tuple(t.dims) for t in out.model.graph.initializer}
    assert shapes["bert.embeddings.word_embeddings.weight"] == (100, 32)
    assert shapes["bert.encoder.layer.1.output.LayerNorm.weight"] == (32,)
    assert shapes["bert.pooler.dense.weight"] == (32, 32)
    assert shapes["classifier.weight"] == (3, 32)

    # 2 heads of 16 (their width stays 64 / 4): Q is [hidden 32, heads*16 = 32].
    narrow = narrow_bert(out.model, hidden=32, heads=2, ffn=64, opset=opset)
    feeds = {k: torch.from_numpy(v) for k, v in case.feeds.items()}
    expected = narrow(**feeds).logits.detach().numpy()
    np.testing.assert_allclose(run(out.model, case.feeds), expected, rtol=1e-4, atol=1e-5)


class ChannelStatistic(torch.nn.Module):
    """Two linear layers with a statistic over the first one's outputs in between."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if self.use == "centre":
            return self.b(y - y.mean(-1, keepdim=True))
        if self.use == "scale by the mean":
            return self.b(y * y.mean(-1, keepdim=True))
        if self.use == "normalize":
            return self.b(torch.nn.functional.normalize(y, dim=-1))
        if self.use == "scale by the norm":
            return self.b(y * y.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return self.b(y * y.amin(-1, keepdim=True))


@pytest.mark.parametrize("use", ["scale by the mean", "normalize", "scale by the norm"])
def test_a_sum_norm_or_mean_over_the_channels_that_is_no_layer_norm_prunes_exactly(use: str):
    """A zero channel adds nothing to a sum or a norm; a mean that is no norm gets a Mul
    by kept / all after it, so it stays the sum over the original count. With the
    removed neurons zeroed the pruned model gives the source's outputs exactly."""
    torch.manual_seed(0)
    model = export(ChannelStatistic(use), (torch.randn(2, 8),), ["x"], 13)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert "removed 8/16 neurons of /a/Gemm" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    shares = [n for n in out.model.graph.node if n.op_type == "Mul" and n.name.endswith("_rescale")]
    assert len(shares) == (use == "scale by the mean")
    if shares:
        share = next(i for i in out.model.graph.initializer if i.name == shares[0].input[1])
        assert numpy_helper.to_array(share).item() == 0.5
    assert_exact(out.model, source, model, {"x": RNG.normal(size=(5, 8)).astype(np.float32)})


def test_normalize_as_torchs_default_exporter_writes_it_prunes_exactly():
    """torch's dynamo exporter (dynamic batch) writes F.normalize as x / Expand(norm,
    [B, N, C]) with C a constant: the expanded norm is the same along the channels,
    so C follows the kept count. Before, the width stayed whole (SwiftFormer so
    exported: 39 of 47 layers, now 47)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    model = export_dynamo(ChannelStatistic("normalize"), (x,), ["x"])
    assert "Expand" in {n.op_type for n in model.graph.node}
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 8/16 neurons of") for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    for batch in (1, 4):
        feeds = {"x": RNG.normal(size=(batch, 3, 8)).astype(np.float32)}
        assert_exact(out.model, source, model, feeds)


@pytest.mark.parametrize(
    ("use", "why"),
    [
        ("minimum", "ReduceMin"),
        ("centre", "ReduceMean /ReduceMean reduces over the channels and is taken back off them"),
    ],
)
def test_a_minimum_or_a_centring_over_the_channels_keeps_the_width(use: str, why: str):
    """A removed zero channel would become the minimum, and y - mean(y) outside a
    LayerNorm would leave each removed channel's -mean out of the next layer: the
    width they read stays whole."""
    model = export(ChannelStatistic(use), (torch.randn(2, 8),), ["x"], 13)
    out = Prune(PruneConfig(sparsity=0.5)).run(model, None)
    assert any(
        n.startswith("skipped /a/Gemm") and why in n and "reduces over the channels" in n
        for n in out.notes
    ), out.notes


@pytest.mark.parametrize("opset", [11, 17])
def test_an_l2_normalize_of_a_conv_map_over_its_channels_prunes_exactly(opset: int):
    """F.normalize(x, dim=1) between two convs: the norm is over axis 1 of NCHW."""

    class MapNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.nn.functional.normalize(torch.relu(self.a(x)), dim=1))

    model = export(MapNorm(), (torch.randn(1, 3, 12, 12),), ["x"], opset)
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert "removed 8/16 channels of /a/Conv" in out.notes, out.notes
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)}
    assert_exact(out.model, source, model, feeds)


class RMSNet(torch.nn.Module):
    """A residual stream under RMSNorm (T5, Llama), written `x * rsqrt(mean(x^2) + eps)`
    or `x / sqrt(mean(x^2) + eps)`; `scaled` multiplies by the mean square instead,
    which is no norm."""

    def __init__(self, width: int, form: str) -> None:
        super().__init__()
        self.form = form
        self.embed = torch.nn.Linear(8, width)
        self.fc1, self.fc2 = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)
        self.g1, self.g2 = (
            torch.nn.Parameter(torch.rand(width) + 0.5),
            torch.nn.Parameter(torch.rand(width) + 0.5),
        )
        self.head = torch.nn.Linear(width, 3)

    def norm(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        square = h.pow(2).mean(-1, keepdim=True)
        if self.form == "rsqrt":
            return h * torch.rsqrt(square + 1e-6) * g
        if self.form == "div":
            return h / torch.sqrt(square + 1e-6) * g
        return h * square * g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h, self.g1))))
        return self.head(self.norm(h, self.g2))


def narrow_rms_net(model: onnx.ModelProto, width: int, form: str) -> RMSNet:
    """An RMSNet of `width` holding the pruned `model`'s weights (MatMul weights found
    by node name, transposed back to Linear's layout)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matmul = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    module = RMSNet(width, form).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            layer, kind = name.rsplit(".", 1) if "." in name else (name, "")
            value = inits[matmul[f"/{layer}/MatMul"]].T if kind == "weight" else inits[name]
            assert tuple(value.shape) == tuple(param.shape), name
            param.copy_(torch.from_numpy(np.array(value)))
    return module


@pytest.mark.parametrize(("opset", "form"), [(13, "rsqrt"), (17, "rsqrt"), (17, "div")])
def test_rms_norm_lets_the_stream_prune_over_the_kept_channels(opset: int, form: str):
    """RMSNorm written out (Pow, ReduceMean, Add, Sqrt, then Div(1, .) and Mul, or Div)
    is followed like a LayerNorm: the stream's width is cut in every member, and the
    result is exactly an RMSNet of the narrower width with the kept weights (the mean
    square now over the kept channels). A mean square used as a plain factor is no
    norm: it keeps its 1 / 16 (a Mul by 8 / 16 after it) instead."""
    torch.manual_seed(0)
    raw = export(RMSNet(16, form), (torch.randn(2, 4, 8),), ["x"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    out = Prune(config).run(model, None)
    assert any(n.startswith("removed 8/16 hidden channels of /embed/MatMul") for n in out.notes)
    assert any("/ReduceMean normalizes over the channels" in n for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"x": RNG.normal(size=(3, 4, 8)).astype(np.float32)}
    expected = narrow_rms_net(out.model, 8, form)(torch.from_numpy(feeds["x"])).detach().numpy()
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-5)

    scaled = export(RMSNet(16, "scaled"), (torch.randn(2, 4, 8),), ["x"], opset)
    out = Prune(config).run(scaled, None)
    assert any(n.startswith("removed 8/16 neurons of /embed/MatMul") for n in out.notes)
    assert not any("normalizes over the channels" in n for n in out.notes), out.notes
    shares = [n for n in out.model.graph.node if n.name.endswith("_rescale")]
    assert [n.op_type for n in shares] == ["Mul", "Mul"], out.notes


@pytest.mark.parametrize(
    ("opset", "kv_heads", "attention"), [(14, 2, "eager"), (17, 2, "sdpa"), (17, 4, "eager")]
)
def test_llama_heads_prune_through_rotary_embeddings_and_shared_kv_heads(
    opset: int, kv_heads: int, attention: str
):
    """A Llama decoder's attention: the rotary embedding slices each head's dims at
    bounds computed from Shape (not the heads axis, so the heads pass), and with
    grouped-query attention repeat_kv expands each K/V head over the query heads that
    read it ([B, KVH, 1, S, D] -> [B, KVH, R, S, D] -> [B, KVH*R, S, D]): one unit is a
    K/V head with its R query heads, and the Expand and Reshape sizes follow the kept
    ones. The hidden width is a graph output here, so the result is exact."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    module = tiny_llama(kv_heads=kv_heads, attention=attention)
    raw = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], opset)
    config = PruneConfig(sparsity=0.5)
    folded = Prune(config).run(raw, None)
    # Only repeat_kv's Expand and Reshape sizes need the shapes folded first.
    folded_first = any(n.startswith("simplified first") for n in folded.notes)
    assert folded_first == (kv_heads < 4), folded.notes
    unit = "K/V heads with their query heads" if kv_heads < 4 else "heads"
    q_proj = "/model/layers.{}/self_attn/q_proj/MatMul"
    for layer in (0, 1):
        removed = f"removed {kv_heads // 2}/{kv_heads} {unit} of {q_proj.format(layer)}"
        assert any(n.startswith(removed) for n in folded.notes), folded.notes

    model = slim(raw)  # what the prune step folds the raw export to
    g.constants_to_initializers(model)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    assert_exact(out.model, source, model, padded_text())

    # The query heads kept are exactly those that read the kept K/V heads.
    def weights(m: onnx.ModelProto, proj: str) -> np.ndarray:
        return matmul_weight(m, f"/model/layers.0/self_attn/{proj}/MatMul")[1]

    rep = 4 // kv_heads
    k_src, k_out = weights(model, "k_proj"), weights(out.model, "k_proj")
    assert k_out.shape == (64, 16 * kv_heads // 2)
    kept_kv = [h for h in range(kv_heads) if any(
        np.array_equal(k_src[:, h * 16 : (h + 1) * 16], k_out[:, j * 16 : (j + 1) * 16])
        for j in range(kv_heads // 2)
    )]  # fmt: skip
    assert len(kept_kv) == kv_heads // 2
    q_src = weights(model, "q_proj")
    kept_q = np.concatenate([q_src[:, h * 16 * rep : (h + 1) * 16 * rep] for h in kept_kv], 1)
    np.testing.assert_array_equal(weights(out.model, "q_proj"), kept_q)


@pytest.mark.parametrize("opset", [11, 17])
def test_convnext_v2_global_response_norm_prunes_its_ffn(opset: int):
    """ConvNeXt V2 (its Atto to Nano sizes are made for the edge) puts a Global
    Response Norm in every FFN: each channel's L2 norm over the map divided by the
    mean of those norms over the channels. That mean used to keep the FFN whole
    (only the stage widths were cut: 2.15x). Like a LayerNorm it now covers the
    kept channels, with a note: with the hidden widths excluded, the result is the
    zeroed source with each GRN mean taken over the kept channels only."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ConvNextV2Config(
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=5
    )

    module = PixelLogits(transformers.ConvNextV2ForImageClassification(config))
    with torch.no_grad():  # transformers starts GRN's scale and shift at zero
        for name, param in module.named_parameters():
            if "grn" in name:
                param.normal_(0.0, 1.0)
    model = export(module, (torch.randn(1, 3, 32, 32),), ["input"], opset)
    g.constants_to_initializers(model)
    everything = PruneConfig(sparsity=0.5)
    whole = Prune(everything).run(model, None)
    assert next(n for n in whole.notes if n.startswith("structured:")).startswith(
        "structured: 17/17 layers pruned"
    ), whole.notes
    assert sum("grn/ReduceMean normalizes over the channels of" in n for n in whole.notes) == 4

    stage = "/m/convnextv2/encoder/stages.{}/"
    widths = [stage.format(i) + "downsampling_layer.1/Conv" for i in (1, 2, 3)]
    config = PruneConfig(
        sparsity=0.5, exclude_nodes=["/m/convnextv2/embeddings/patch_embeddings/Conv", *widths]
    )
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert [n for n in out.notes if n.startswith("removed")] == [
        f"removed {c * 2}/{c * 4} neurons of {stage.format(i)}layers.0/pwconv1/MatMul"
        for i, c in enumerate((16, 32, 64, 128))
    ], out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    # The oracle: the zeroed source, each GRN's mean over all 4c channels scaled to
    # the mean over the 2c kept ones.
    oracle = onnx.ModelProto()
    oracle.CopyFrom(source)
    nodes = oracle.graph.node
    for i in reversed([i for i, n in enumerate(nodes) if n.name.endswith("grn/ReduceMean")]):
        scaled, nodes[i].output[0] = nodes[i].output[0], nodes[i].output[0] + "_over_all"
        oracle.graph.initializer.append(numpy_helper.from_array(np.float32(2.0), scaled + "_k"))
        nodes.insert(i + 1, helper.make_node("Mul", [nodes[i].output[0], scaled + "_k"], [scaled]))
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert_exact(out.model, oracle, model, {"input": images})


def slimmed_export(module: torch.nn.Module, size: int, opset: int) -> onnx.ModelProto:
    """`module` exported and slimmed first, as the prune step itself slims where
    computed shapes keep a group whole, so that zeroing and pruning plan on one graph."""
    model = slim(export(module, (torch.randn(1, 3, size, size),), ["input"], opset))
    g.constants_to_initializers(model)
    return model


def prune_zeroed_exactly(
    model: onnx.ModelProto, config: PruneConfig, constants: bool, size: int, batch: int = 2
) -> list[str]:
    """`prune_zeroed_exact_on` one batch of images of `size` (input "input")."""
    images = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    return prune_zeroed_exact_on(model, config, [{"input": images}], constants)


def prune_zeroed_exact_on(
    model: onnx.ModelProto,
    config: PruneConfig,
    feeds: list[dict[str, np.ndarray]],
    constants: bool = False,
) -> list[str]:
    """Prune `model` with the units the pruner removes zeroed first (its weights as
    Constant nodes if `constants`): the result passes the checker, has the predicted
    parameter count and computes the zeroed source's outputs on every one of `feeds`.
    Its notes."""
    source = zero_removed(model, config)
    if constants:
        source = to_constant_nodes(source)
    out = Prune(config).run(source, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    for feed in feeds:
        assert_exact(out.model, source, model, feed)
    return out.notes


class Cbam(torch.nn.Module):
    """CBAM (Woo et al., 2018): channel attention from the average- and max-pooled map
    through one shared MLP, then spatial attention from the mean and the maximum over
    the channels through a 7x7 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels // 4, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(channels // 4, channels, 1),
        )
        self.spatial = torch.nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(gate)
        stats = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(self.spatial(stats))


class CbamNet(torch.nn.Module):
    """A small residual CNN with a CBAM after its stem and in its residual branch."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, stride, 1),
                torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(),
            )

        self.stem, self.stem_att = block(3, 16), Cbam(16)
        self.branch = torch.nn.Sequential(block(16, 32, 2), block(32, 32), Cbam(32))
        self.shortcut = torch.nn.Conv2d(16, 32, 1, 2)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_att(self.stem(x))
        x = torch.relu(self.branch(x) + self.shortcut(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("opset", "constants"), [(11, False), (13, True), (17, False)])
def test_cbam_spatial_attention_prunes_through_its_channel_mean_and_maximum(
    opset: int, constants: bool
):
    """CBAM's spatial attention reads the mean and the maximum over the channels, which
    kept every group it saw whole. The mean now gets a Mul by kept / all after it (it
    stays the sum over the original count) and the maximum of non-negative channels
    does not see zero ones go, so with the removed channels zeroed the pruned model
    gives the source's outputs exactly. Every layer is cut but the two spatial convs
    (two statistics in, one map out: nothing to cut); the head loses inputs."""
    torch.manual_seed(0)
    module = CbamNet()
    for norm in module.modules():  # trained-looking BatchNorms, so folding matters
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    model = slimmed_export(module, 16, opset)
    assert sum(n.op_type == "ReduceMax" for n in model.graph.node) >= 2
    config = PruneConfig(sparsity=0.5)
    notes = prune_zeroed_exactly(model, config, constants, 16)
    assert next(n for n in notes if n.startswith("structured:")).startswith(
        "structured: 13/15 layers pruned"
    ), notes
    maxima = [n for n in notes if " takes the maximum over the channels of " in n]
    assert len(maxima) == 2, notes
    assert (
        "scaled 2 means over the channels by the share kept (a Mul after each, so each stays "
        "the sum over the source's count): /stem_att/ReduceMean_1 by 8/16, "
        "/branch/branch.2/ReduceMean_1 by 16/32"
    ) in notes, notes
    out = Prune(config).run(model, None).model
    rescales = [n for n in out.graph.node if n.op_type == "Mul" and n.name.endswith("_rescale")]
    assert len(rescales) == 2
    shares = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert sorted(shares[n.input[1]].item() for n in rescales) == [0.5, 0.5]


@pytest.mark.parametrize(("opset", "constants"), [(11, False), (13, True), (17, False)])
def test_swiftformer_additive_attention_prunes_through_its_l2_normalize(
    opset: int, constants: bool
):
    """SwiftFormer (made for phones) normalizes its query and key with F.normalize over
    the channels (ReduceL2, a Clip floor, an Expand back to Shape(x), a Div) and
    tiles the global query over the tokens. Each attention's to_query, to_key and
    proj used to stay whole (39/47 layers, 2.99x at 0.5). A zero channel adds
    nothing to an L2 norm, so with the removed channels zeroed the pruned model
    gives the source's outputs exactly, with no normalization note."""
    torch.manual_seed(0)
    module, size = phone_vision("swiftformer")
    model = slimmed_export(module, size, opset)
    assert sum(n.op_type == "ReduceL2" for n in model.graph.node) == 8
    config = PruneConfig(sparsity=0.5)
    notes = prune_zeroed_exactly(model, config, constants, size)
    assert next(n for n in notes if n.startswith("structured:")).startswith(
        "structured: 47/47 layers pruned"
    ), notes
    attention = "/m/swiftformer/encoder/network.{}/blocks.0/attn/to_query/MatMul"
    removed = [n for n in notes if n.startswith("removed")]
    for stage, width in zip((0, 2, 4, 6), (16, 24, 32, 48), strict=True):
        assert any(
            n.startswith(f"removed {width // 2}/{width} ") and attention.format(stage) in n
            for n in removed
        ), removed
    assert not any("normalizes over the channels of" in n for n in notes)
    plan = planned(model, config, [])
    assert plan.before / plan.predicted >= 3.5


@pytest.mark.parametrize(("opset", "constants"), [(13, True), (17, False)])
def test_levit_heads_prune_through_its_token_batch_norms(opset: int, constants: bool):
    """LeViT (made for fast inference on CPUs and phones) flattens the tokens for a
    BatchNorm after every linear layer and views the result back as heads
    ([B*N, H*(2K+V)] -> [B, N, H, -1]) before splitting each head into its query,
    key and value (unequal parts) and adding a learnt bias per head to the scores.
    Its attentions used to stay whole (2.2x at 0.5); now whole heads go, with their
    biases, and with the removed units zeroed the outputs are the source's."""
    torch.manual_seed(0)
    module, size = phone_vision("levit")
    with torch.no_grad():  # transformers starts the attention biases at zero
        for name, param in module.named_parameters():
            if "attention_biases" in name:
                param.normal_(0.0, 1.0)
    model = slimmed_export(module, size, opset)
    config = PruneConfig(sparsity=0.5)
    notes = prune_zeroed_exactly(model, config, constants, size)
    assert next(n for n in notes if n.startswith("structured:")).startswith(
        "structured: 27/27 layers pruned"
    ), notes
    assert not any(n.startswith("skipped") and "Reshape" in n for n in notes), notes
    qkv = "/m/levit/encoder/stages.0/layers.0/module/queries_keys_values/linear/MatMul"
    assert any(n.startswith("removed 1/2 heads of") and qkv in n for n in notes), notes
    plan = planned(model, config, [])
    assert plan.before / plan.predicted >= 3.3  # 2.2x when the attentions stayed whole


@pytest.mark.parametrize(("opset", "constants"), [(13, True), (17, False)])
def test_focalnet_keeps_its_gates_and_prunes_the_rest_of_their_projection(
    opset: int, constants: bool
):
    """FocalNet's modulation projects to [q, ctx, gates] in one layer and multiplies
    each focal level's context by one gate channel sliced off the rest, which scales
    all of them. Those gates used to keep the whole projection (and with it the
    focal convs) from pruning: 21/33 layers, 2.65x at 0.5. Now the gates stay, with
    a note, while q and ctx go; with the LayerNorm-normalized stage widths excluded,
    exactly."""
    torch.manual_seed(0)
    module, size = phone_vision("focalnet")
    model = slimmed_export(module, size, opset)
    everything = PruneConfig(sparsity=0.5)
    whole = Prune(everything).run(model, None)
    assert next(n for n in whole.notes if n.startswith("structured:")).startswith(
        "structured: 33/33 layers pruned"
    ), whole.notes
    gates = [n for n in whole.notes if n.startswith("kept 3 channels of")]
    assert len(gates) == 4 and all("multiplies it into other channels" in n for n in gates)
    plan = planned(model, everything, [])
    assert plan.before / plan.predicted >= 3.5
    # The floor counts the units that may go: the gates do not stand in for them.
    for scope in ("layer", "global"):
        almost = planned(model, PruneConfig(sparsity=0.99, scope=scope), [])
        stage0 = next(
            grp
            for grp in almost.groups.prunable
            if any("stages.0/layers.0/modulation/projection_in" in n.name for n in grp.producers)
        )
        assert len(stage0.pinned) == 3
        assert len(almost.chosen[stage0.root]) == len(stage0.units) - 3 - 1

    widths = [
        "/m/focalnet/embeddings/patch_embeddings/projection/Conv",
        *(f"/m/focalnet/encoder/stages.{i}/downsample/projection/Conv" for i in (0, 1, 2)),
    ]
    config = PruneConfig(sparsity=0.5, exclude_nodes=widths)
    notes = prune_zeroed_exactly(model, config, constants, size)
    modulation = "/m/focalnet/encoder/stages.{}/layers.0/modulation/projection_in/MatMul"
    for stage, width in enumerate((16, 32, 64, 128)):  # q and ctx: 2 x width, + 3 gates
        assert any(
            n.startswith(f"removed {width}/{2 * width + 3} channels of ")
            and modulation.format(stage) in n
            for n in notes
        ), notes


@pytest.mark.parametrize(("opset", "constants"), [(13, True), (17, False)])
def test_cvt_attention_written_as_einsum_prunes_its_heads(opset: int, constants: bool):
    """CvT computes its attention with Einsum ('bhlk,bhtk->bhlt', then
    'bhlt,bhtv->bhlv'), which used to stop every query, key and value projection
    (137,904 -> 45,896 parameters at 0.5, 3.0x; now 4.0x). The heads go through it;
    with the LayerNorm-normalized stage widths excluded the pruned model is exact."""
    torch.manual_seed(0)
    module, size = phone_vision("cvt")
    model = slimmed_export(module, size, opset)
    assert sum(n.op_type == "Einsum" for n in model.graph.node) == 12
    whole = planned(model, PruneConfig(sparsity=0.5), [])
    assert whole.before / whole.predicted >= 3.8

    widths = [
        f"/m/cvt/encoder/stages.{i}/embedding/convolution_embeddings/projection/Conv"
        for i in range(3)
    ]
    config = PruneConfig(sparsity=0.5, exclude_nodes=widths)
    notes = prune_zeroed_exactly(model, config, constants, size)
    query = "/m/cvt/encoder/stages.2/layers.{}/attention/attention/projection_query/MatMul"
    for layer in range(3):
        assert any(
            n.startswith("removed 2/3 heads of") and query.format(layer) in n for n in notes
        ), notes
    assert not any("Einsum" in n for n in notes), notes


@pytest.mark.parametrize(("opset", "constants"), [(11, False), (13, True), (17, False)])
def test_segformer_heads_prune_after_onnxslim_writes_its_projections_as_gemm(
    opset: int, constants: bool
):
    """SegFormer splits heads as view(B, N, -1, D); once onnxslim (which the prune step
    runs where it helps) writes each projection of a fixed-size export as Reshape
    [-1, C], Gemm, the split reads [B*N, C] -> [B, N, -1, D], which kept every query,
    key and value whole. Its tokens go back to a map as [B, H*W, C] -> [B, H, W, -1],
    which must not be read as heads of one channel. Every layer prunes and, with the
    LayerNorm'd stage widths and the sequence-reduction conv excluded, the heads,
    Mix-FFNs and decoder prune exactly."""
    torch.manual_seed(0)
    module, size = phone_vision("segformer")
    # one image of a fixed size, as segmenters ship to devices
    model = slim(export(module, (torch.randn(1, 3, size, size),), ["input"], opset, static=True))
    g.constants_to_initializers(model)
    assert sum(n.op_type == "Gemm" for n in model.graph.node) >= 6
    notes = Prune(PruneConfig(sparsity=0.5)).run(model, None).notes
    assert next(n for n in notes if n.startswith("structured:")).startswith(
        "structured: 21/21 layers pruned"
    ), notes
    stage = "/m/segformer/stages.{}/"
    widths = [
        stage.format(0) + "patch_embeddings/proj/Conv",
        stage.format(1) + "patch_embeddings/proj/Conv",
        stage.format(0) + "blocks.0/attention/sequence_reduction/sequence_reduction/Conv",
    ]
    config = PruneConfig(sparsity=0.5, exclude_nodes=widths)
    notes = prune_zeroed_exactly(model, config, constants, size, batch=1)
    query = stage.format(1) + "blocks.0/attention/q_proj/MatMul"
    assert any(n.startswith("removed 1/2 heads of") and query in n for n in notes), notes
    assert not any("normalizes over the channels" in n for n in notes), notes


@pytest.mark.parametrize(("opset", "constants"), [(11, False), (13, True), (17, False)])
def test_deberta_v3_relative_attention_prunes_heads_and_hidden_width(opset: int, constants: bool):
    """DeBERTa-v3 scores each head's query against position keys (and its key against
    position queries): the same query / key projections run over a LayerNorm'd table
    of relative embeddings, and GatherElements picks each pair's score by a position
    index expanded over the heads (folded into the batch axis). Both kept it at 6/18
    layers (1.27x at 0.5). Now the table's columns join the hidden width and the
    index follows the kept heads: 18/18 layers, and with the hidden width excluded
    (its LayerNorms are not exact) the heads and FFNs prune exactly. A fixed-size
    export: with a dynamic batch the heads stay folded through the scores."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 16))
    model = export(tiny_deberta_v3(), (ids,), ["input_ids"], opset, static=True)
    g.constants_to_initializers(model)
    assert sum(n.op_type == "GatherElements" for n in model.graph.node) == 4
    config = PruneConfig(sparsity=0.5)
    out = Prune(config).run(model, None)
    assert next(n for n in out.notes if n.startswith("structured:")).startswith(
        "structured: 18/18 layers pruned"
    ), out.notes
    assert any(
        n.startswith("removed 32/64 hidden channels of /deberta/embeddings/word_embeddings")
        for n in out.notes
    ), out.notes
    table = g.initializer_map(out.model.graph)["deberta.encoder.rel_embeddings.weight"]
    assert tuple(table.dims) == (16, 32)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    assert run(out.model, {"input_ids": ids.numpy()}).shape == (1, 3)

    narrow = PruneConfig(sparsity=0.5, exclude_nodes=["/deberta/embeddings/word_embeddings/Gather"])
    source = zero_removed(model, narrow)
    if constants:
        source = to_constant_nodes(source)
    out = Prune(narrow).run(source, None)
    query = "/deberta/encoder/layer.{}/attention/self/query_proj/MatMul"
    for layer in (0, 1):
        assert any(
            n.startswith(f"removed 2/4 heads of {query.format(layer)}") for n in out.notes
        ), out.notes
    assert_exact(out.model, source, model, {"input_ids": ids.numpy()})


def test_pruning_writes_no_onnxruntime_warnings_to_stderr(capfd):
    """MobileBERT's export leaves many unused constants; the sessions that probe shapes
    and measure channels used to print a warning line to the user's stderr for each."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileBertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        embedding_size=32,
        intra_bottleneck_size=32,
        num_feedforward_networks=2,
        num_labels=3,
    )
    module = transformers.MobileBertForSequenceClassification(config)
    ids = torch.randint(0, 100, (1, 8))
    model = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], 17)
    g.constants_to_initializers(model)
    capfd.readouterr()
    out = Prune(PruneConfig(sparsity=0.5)).run(model, None)
    assert next(n for n in out.notes if n.startswith("structured:")).startswith(
        "structured: 25/25 layers pruned"
    ), out.notes
    assert "onnxruntime" not in capfd.readouterr().err


def over_kept_channels(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each one-group GroupNorm taken over the channels its affine scale
    keeps (nonzero) only: Gather them before the norm, and after it map every channel
    to a kept one (a removed channel's value is then scaled by 0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, inits = out.graph.node, {t.name: t for t in out.graph.initializer}
    producer = {o: n for n in nodes for o in n.output}
    norms = [n for n in nodes if n.op_type == "InstanceNormalization"]
    for k, norm in enumerate(norms):
        split = producer[norm.input[0]]
        back = next(n for n in nodes if n.input and n.input[0] == norm.output[0])
        shape = producer[back.input[1]]
        scale = next(n for n in nodes if n.op_type == "Mul" and back.output[0] in n.input)
        weight = numpy_helper.to_array(inits[next(i for i in scale.input if i in inits)])
        kept = np.flatnonzero(weight.reshape(-1))
        where = np.zeros(weight.size, np.int64)
        where[kept] = np.arange(len(kept))
        x, full = split.input[0], back.output[0]
        out.graph.initializer.extend(
            [numpy_helper.from_array(kept, f"kept{k}"), numpy_helper.from_array(where, f"map{k}")]
        )
        split.input[0] = shape.input[0] = f"x{k}"
        back.output[0] = f"normed{k}"
        nodes.insert(list(nodes).index(back) + 1, helper.make_node(
            "Gather", [f"normed{k}", f"map{k}"], [full], axis=1
        ))  # fmt: skip
        first = min(list(nodes).index(split), list(nodes).index(shape))
        nodes.insert(first, helper.make_node("Gather", [x, f"kept{k}"], [f"x{k}"], axis=1))
    return out


@pytest.mark.parametrize("opset", [11, 17])
def test_one_group_group_norm_prunes_like_a_layer_norm(opset: int):
    """PoolFormer (and MobileViTv2) normalize each map over all its channels and
    positions with GroupNorm(1, C), which torch exports as a Reshape to [0, 1, -1],
    InstanceNormalization and a Reshape back. One group was one unit, so the stage
    widths silently stayed whole (8/13 layers, 1.37x). Now, as for a LayerNorm, the
    statistics cover the kept channels, with a note: the result is the zeroed source
    with every such norm taken over its kept channels only."""
    import transformers

    torch.manual_seed(0)
    config = transformers.PoolFormerConfig(
        num_labels=5, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64]
    )

    module = PixelLogits(transformers.PoolFormerForImageClassification(config))
    with torch.no_grad():  # a trained net's norms do not all start at 1 and 0
        for name, param in module.named_parameters():
            if "norm" in name or "layer_scale" in name:
                param.normal_(0.0, 1.0)
    model = export(module, (torch.randn(1, 3, 32, 32),), ["input"], opset)
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    summary = next(n for n in out.notes if n.startswith("structured:"))
    assert summary.startswith("structured: 13/13 layers pruned"), out.notes
    hidden = [n for n in out.notes if " hidden channels of " in n]
    assert [n.split(" hidden")[0] for n in hidden] == [
        f"removed {c}/{2 * c}" for c in (8, 16, 24, 32)
    ], out.notes
    assert sum(n.startswith("GroupNorm ") and "statistics" in n for n in out.notes) == 4
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert_exact(out.model, over_kept_channels(source), model, {"input": images})


def matmul_weight(model: onnx.ModelProto, node_name: str) -> tuple[str, np.ndarray]:
    """The constant right operand of MatMul `node_name`: its name and its value."""
    name = next(n.input[1] for n in model.graph.node if n.name == node_name)
    return name, numpy_helper.to_array(g.initializer_map(model.graph)[name])


def silence_removed_heads(model: onnx.ModelProto, q_proj: str, o_proj: str, heads: int) -> int:
    """Zero the output-projection rows of every head whose Q columns are zero, and
    return how many. With one K/V head kept, such a head still attends (uniformly)
    to V; only with its output rows zeroed too does it add nothing, as when pruned."""
    q = matmul_weight(model, q_proj)[1]
    o_name, o = matmul_weight(model, o_proj)
    gone = ~q.reshape(q.shape[0], heads, -1).any(axis=(0, 2))
    o = o.reshape(heads, -1, o.shape[1]).copy()
    o[gone] = 0
    g.replace_initializer(model.graph, o_name, o.reshape(-1, o.shape[2]))
    return int(gone.sum())


class FoldedGqa(torch.nn.Module):
    """Grouped-query attention (4 query heads of 16, `kv` K/V heads) written the way
    torch's dynamo exporter decomposes sdpa: K is expanded over its query heads and
    folded through the batch axis ([B, KVH, R, S, D] -> [B*H, S, D]), transposed
    there and unfolded ([B, H, D, S]); V is expanded and folded as repeat_kv does.
    Batch 2 and length 8 are written in, as in a static export."""

    def __init__(self, kv: int) -> None:
        super().__init__()
        self.kv = kv
        self.q = torch.nn.Linear(32, 64, bias=False)
        self.k = torch.nn.Linear(32, 16 * kv, bias=False)
        self.v = torch.nn.Linear(32, 16 * kv, bias=False)
        self.o = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, kv, d = 2, 8, 4, self.kv, 16
        q = self.q(x).reshape(b, s, h, d).transpose(1, 2)
        k = self.k(x).reshape(b, s, kv, d).transpose(1, 2).unsqueeze(2)
        v = self.v(x).reshape(b, s, kv, d).transpose(1, 2).unsqueeze(2)
        k = k.expand(b, kv, h // kv, s, d).reshape(b * h, s, d).transpose(1, 2)
        v = v.expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
        scale = d**-0.25
        probs = torch.softmax((q * scale) @ (k.reshape(b, h, d, s) * scale), -1)
        y = (probs @ v).transpose(1, 2).reshape(b, s, h * d)
        return self.head(torch.relu(self.o(y)))


class BiasedAttention(torch.nn.Module):
    """Window attention as Swin writes it: 4 heads of 8 over a 7x7 window, scores
    plus a learnt per-head bias looked up in a [(2*7-1)^2, H] table by a fixed
    index, viewed [N, N, H] and moved to [1, H, N, N] at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.proj = torch.nn.Linear(32, 32)
        self.table = torch.nn.Parameter(torch.randn(169, 4))
        self.register_buffer("index", torch.randint(0, 169, (49 * 49,)))
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], 49
        qkv = self.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        probs = torch.softmax(q @ k.transpose(-2, -1) * 8**-0.5 + bias, -1)
        y = (probs @ v).transpose(1, 2).reshape(b, n, 32)
        return self.head(torch.relu(self.proj(y)))


def test_a_bias_table_moved_to_the_heads_at_run_time_is_cut_with_them():
    """torch's default exporter leaves Swin's relative position bias as a [N*N, H]
    constant with Reshape, Transpose and Unsqueeze after it. Those only move its
    values, so they are folded into one [1, H, N, N] constant (the source constant
    goes) and its heads axis is cut with the heads. Before, every attention stayed
    whole (torchvision's swin_t so exported with a dynamic batch: 2.97x at 0.5,
    now 3.94x). Exact at two batch sizes."""
    torch.manual_seed(0)
    x = torch.randn(2, 49, 32)
    model = export_dynamo(BiasedAttention(), (x,), ["x"])
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    plan = planned(model, config, notes)
    assert any(n.endswith("Reshape / Transpose nodes over constant weights folded") for n in notes)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 2/4 heads of") for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    biases = [i for i in out.model.graph.initializer if list(i.dims) == [1, 2, 49, 49]]
    assert len(biases) == 1
    for batch in (2, 5):
        feeds = {"x": RNG.normal(size=(batch, 49, 32)).astype(np.float32)}
        assert_exact(out.model, source, model, feeds)


class SizedGqa(FoldedGqa):
    """FoldedGqa's repeat_kv with the batch and length read from x: TorchScript's
    export of `expand(b, kv, r, s, d)` with dynamic axes writes the shape as
    Where(shape == -1, 1, shape) over Reshape(Concat(..), [-1])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, kv, d = x.shape[0], x.shape[1], 4, self.kv, 16
        q = self.q(x).reshape(b, s, h, d).transpose(1, 2)
        k = self.k(x).reshape(b, s, kv, d).transpose(1, 2).unsqueeze(2)
        v = self.v(x).reshape(b, s, kv, d).transpose(1, 2).unsqueeze(2)
        k = k.expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
        v = v.expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
        probs = torch.softmax(q @ k.transpose(-2, -1) * d**-0.5, -1)
        y = (probs @ v).transpose(1, 2).reshape(b, s, h * d)
        return self.head(torch.relu(self.o(y)))


def test_repeat_kv_with_a_dynamic_batch_from_torchscript():
    """The K/V heads' count in that computed Expand shape is a constant behind the
    Reshape to [-1] (a vector reshaped to [-1] is itself), so it follows the kept
    K/V heads. Before, the attention stayed whole (2/5 layers). Exact at two batch
    sizes."""
    torch.manual_seed(0)
    model = export(SizedGqa(2), (torch.randn(2, 8, 32),), ["x"], 17)
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 1/2 K/V heads with their query heads") for n in out.notes), (
        out.notes
    )
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    for batch in (2, 3):
        feeds = {"x": RNG.normal(size=(batch, 8, 32)).astype(np.float32)}
        assert_exact(out.model, source, model, feeds)


class SizedAttention(FoldedGqa):
    """Attention of 4 heads with every size read from the tensors (`x.shape`,
    `k.shape`), as a dynamic-shape export writes it: K's fold to [B*H, S, D] and
    back reads S, D, B and H from K itself."""

    def __init__(self) -> None:
        super().__init__(kv=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, d = x.shape[0], x.shape[1], 4, 16
        q = self.q(x).reshape(b, s, h, d).transpose(1, 2)
        k = self.k(x).reshape(b, s, h, d).transpose(1, 2)
        v = self.v(x).reshape(b, s, h, d).transpose(1, 2)
        n = k.shape
        k = k.reshape(-1, n[-2], n[-1]).transpose(1, 2).reshape(n[0], n[1], n[-1], n[-2])
        probs = torch.softmax(q @ k * d**-0.5, -1)
        y = (probs @ v).transpose(1, 2).reshape(b, s, h * d)
        return self.head(torch.relu(self.o(y)))


@pytest.mark.parametrize("opset", [13, 17])
def test_kv_fold_with_sizes_read_at_run_time(opset: int):
    """torch's TorchScript exporter with dynamic axes reads each size as
    Unsqueeze(Gather(Shape(k), i)): K's own head count among them, which then only
    sizes the fold's own Reshapes. Exact at the export's batch and at another;
    before, the attention stayed whole."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    model = export(SizedAttention(), (x,), ["x"], opset)
    g.constants_to_initializers(model)
    shapes = ((2, 8, 32), (3, 8, 32))  # the batch is dynamic
    feeds = [{"x": RNG.normal(size=shape).astype(np.float32)} for shape in shapes]
    notes = prune_zeroed_exact_on(model, PruneConfig(sparsity=0.5), feeds)
    assert any(n.startswith("removed 2/4 heads of /q/MatMul") for n in notes), notes


@pytest.mark.parametrize(("opset", "kv"), [(14, 2), (17, 2), (17, 1)])
def test_kv_heads_folded_through_the_batch_axis(opset: int, kv: int):
    """The K path above is no single rule's: the run of Reshape, Transpose, Reshape
    is executed on index arrays. With 2 K/V heads their ids come out on the heads
    axis each repeated for its query heads, the entries holding them (B*H, H)
    following the kept count: a unit is one K/V head with its query heads. With one
    (multi-query) the run is executed from the Expand on the index of each copy,
    which must come out whole on the heads axis: the query heads are the units and
    the copies follow them. Exact either way. Before, the attention stayed whole
    (a Llama from torch's dynamo exporter: 6/14 layers, now 14/14, and 10/14 with
    one K/V head)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    model = export(FoldedGqa(kv), (x,), ["x"], opset, static=True)
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    if kv == 1:
        assert silence_removed_heads(source, "/q/MatMul", "/o/MatMul", heads=4) == 2
    out = Prune(config).run(source, None)
    removed = "removed 2/4 heads" if kv == 1 else "removed 1/2 K/V heads with their query heads"
    assert any(n.startswith(f"{removed} of /q/MatMul") for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    assert_exact(out.model, source, model, {"x": x.numpy()})


@pytest.mark.parametrize(("opset", "attention"), [(14, "sdpa"), (17, "eager")])
def test_multi_query_attention_prunes_query_heads_around_the_one_kv_head(
    opset: int, attention: str
):
    """Multi-query attention (Gemma-2B, Falcon: one K/V head): repeat_kv expands the
    one head to [B, 1, R, S, D] and folds it to [B, R, S, D], so every query head
    reads a copy. The K/V head stays whole and the query heads are units of their
    own: the copies follow the kept count (the Expand's R and the Reshape's R, also
    behind sdpa's scale Mul). Before, all four heads were one unit with the K/V head
    and no attention layer was pruned."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    module = tiny_llama(kv_heads=1, attention=attention)
    raw = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], opset)
    config = PruneConfig(sparsity=0.5)
    model = slim(raw)
    g.constants_to_initializers(model)
    source = zero_removed(model, config)

    def weights(m: onnx.ModelProto, layer: int, proj: str) -> np.ndarray:
        return matmul_weight(m, f"/model/layers.{layer}/self_attn/{proj}/MatMul")[1]

    for layer in (0, 1):
        attn = f"/model/layers.{layer}/self_attn"
        removed = silence_removed_heads(source, f"{attn}/q_proj/MatMul", f"{attn}/o_proj/MatMul", 4)
        assert removed == 2
    out = Prune(config).run(source, None)
    for layer in (0, 1):
        attn = f"/model/layers.{layer}/self_attn"
        assert any(n.startswith(f"removed 2/4 heads of {attn}/q_proj/MatMul") for n in out.notes)
        assert any(
            n.startswith(f"skipped {attn}/v_proj/MatMul: MatMul {attn}/MatMul_1 reads one K/V")
            for n in out.notes
        ), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    assert_exact(out.model, source, model, padded_text())

    for proj in ("k_proj", "v_proj"):
        np.testing.assert_array_equal(weights(out.model, 0, proj), weights(model, 0, proj))
    assert weights(out.model, 0, "q_proj").shape == (64, 32)
    assert weights(out.model, 0, "o_proj").shape == (32, 64)


@pytest.mark.parametrize(
    ("kv", "layers", "removed"), [(2, 14, "1/2 K/V heads"), (1, 10, "2/4 heads")]
)
def test_grouped_query_attention_with_dynamic_shapes_from_torchs_default_exporter(
    kv: int, layers: int, removed: str
):
    """A Llama (4 query heads, `kv` K/V heads) exported as torch's default exporter
    writes it with dynamic batch and sequence: every Reshape has `allowzero`, the
    head views' targets are [B, S, -1, D] with B and S read by `Shape` at run time,
    and sdpa's K is folded to [B*H, S, D] and back to [B, H, D, S] by targets read
    from its own shape. A computed entry is never read as "copy the input dim", so
    `allowzero` only blocks a literal 0, and the fold is executed with each read
    entry taking its tensor's size at the kept count, as it will at run time. With
    one K/V head (multi-query) its copies fold the same way and the query heads
    prune around it. Before, only the FFNs pruned (6/14 layers); now as with fixed
    shapes (14/14, and 10/14 with one K/V head), exact at the export's shapes and
    at others."""
    torch.manual_seed(0)
    module = tiny_llama(kv_heads=kv, attention="sdpa")
    ids = torch.randint(0, 100, (2, 8))
    model = export_dynamo(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"])
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    if kv == 1:  # the attention (q) and output (o) projections of layers 0 and 1
        for q, o in (("node_linear", "node_linear_3"), ("node_linear_7", "node_linear_10")):
            assert silence_removed_heads(source, q, o, heads=4) == 2
    out = Prune(config).run(source, None)
    assert f"structured: {layers}/14 layers pruned" in " ".join(out.notes), out.notes
    assert sum(n.startswith(f"removed {removed}") for n in out.notes) == 2
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config, []).predicted
    assert_exact(out.model, source, model, padded_text())
    other = {"input_ids": RNG.integers(0, 100, (1, 5)), "attention_mask": np.ones((1, 5), np.int64)}
    assert_exact(out.model, source, model, other)


@pytest.mark.parametrize("opset", [14, 17])
def test_single_head_attention_prunes_its_channels(opset: int):
    """transformers' SegFormer (its B0 has one head in the first stage, like this
    one): a single head keeps its channels on the last axis, so Q and K's dims are
    one group (the scores contract over them) and probs @ V hands V's columns on to
    the output projection. With the LayerNorm-normalized widths excluded, the
    result is exact; before, V of a one-head stage stayed whole."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=4,
    )  # fmt: skip

    logits = PixelLogits(transformers.SegformerForSemanticSegmentation(config))

    raw = export(logits, (torch.randn(1, 3, 32, 32),), ["input"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    stage = "/m/segformer/stages.{}"
    reduction = "/blocks.0/attention/sequence_reduction/sequence_reduction/Conv"
    excluded = [stage.format(0) + reduction] + [
        stage.format(i) + "/patch_embeddings/proj/Conv" for i in (0, 1)
    ]
    config_ = PruneConfig(sparsity=0.5, exclude_nodes=excluded)
    source = zero_removed(model, config_)
    out = Prune(config_).run(source, None)
    attention = stage.format(0) + "/blocks.0/attention/{}_proj/MatMul"
    qk = f"removed 8/16 neurons of {attention.format('q')}, {attention.format('k')}"
    assert qk in out.notes, out.notes
    assert f"removed 8/16 neurons of {attention.format('v')}" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == planned(model, config_, []).predicted
    feeds = {"input": RNG.normal(size=(3, 3, 32, 32)).astype(np.float32)}
    expected, before = run(source, feeds), run(model, feeds)
    assert np.abs(before - expected).max() > 0.1 * np.abs(before).max()
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-7)


class UnfoldNet(torch.nn.Module):
    """MobileViT's unfold and fold (its exported Reshape/Transpose runs, targets as
    written with the batch folded into a -1) around a token MLP on a residual, without
    MobileViT's LayerNorms so that pruning the width is exact."""

    C, P, N = 8, 4, 4  # channels, pixels per 2x2 patch, patches of the 4x4 map

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv_1x1 = torch.nn.Conv2d(16, self.C, 1)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(self.C, 16), torch.nn.ReLU(), torch.nn.Linear(16, self.C)
        )
        self.proj = torch.nn.Conv2d(self.C, 16, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, p, n = self.C, self.P, self.N
        f = self.conv_1x1(torch.relu(self.stem(x)))  # [B, C, 4, 4]
        tokens = f.reshape(-1, 2, 2, 2).transpose(1, 2).reshape(-1, c, n, p)
        tokens = tokens.transpose(1, 3).reshape(-1, n, c)  # [B*P, N, C]
        tokens = tokens + self.mlp(tokens)
        back = tokens.reshape(-1, p, n, c).transpose(1, 3).reshape(-1, 2, 2, 2)
        back = back.transpose(1, 2).reshape(-1, c, 4, 4)
        y = torch.relu(self.proj(back))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("opset", [13, 17])
def test_channels_folded_through_the_batch_axis_and_back_prune_exactly(opset: int):
    """MobileViT's unfold moves the channels into the batch axis with the patch rows
    ([B, C, H, W] -> [B*C*nh, ph, nw, pw]) before they come out on the last axis of
    [B*P, N, C], and the fold takes them back. The run of Reshapes and Transposes is
    checked by executing it on index arrays: the width of conv_1x1, the token MLP's
    output and the fold is one group, and cutting it is exact."""
    torch.manual_seed(0)
    raw = export(UnfoldNet(), (torch.randn(2, 3, 8, 8),), ["input"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 6
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    width = "removed 4/8 channels of /conv_1x1/Conv, /mlp/mlp.2/MatMul"
    assert any(n.startswith(width) for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"input": RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)}
    expected, before = run(source, feeds), run(model, feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-5)


class RoiNet(torch.nn.Module):
    """A box head's RoiAlign over a feature map (torchvision.ops.roi_align, as Faster
    R-CNN's MultiScaleRoIAlign calls per level), then a conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.box = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6 * 4, 5)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.features(x))
        pooled = torchvision.ops.roi_align(f, rois, output_size=(2, 2), spatial_scale=1.0)
        return self.head(torch.relu(self.box(pooled)).flatten(1))


@pytest.mark.parametrize("opset", [11, 17])
def test_roi_align_passes_the_channels_it_pools(opset: int):
    """RoiAlign pools every channel over every region: the feature conv's channels
    reach the box conv through it and prune exactly (before, RoiAlign kept the FPN
    outputs of torchvision's Faster R-CNN whole)."""
    torch.manual_seed(0)
    rois = torch.tensor([[0, 0.0, 0.0, 6.0, 6.0], [1, 2.0, 1.0, 7.0, 5.0]])
    raw = export(RoiNet(), (torch.randn(2, 3, 8, 8), rois), ["x", "rois"], opset)
    config = PruneConfig(sparsity=0.5)
    plan = planned(raw, config, [])
    assert len(plan.groups.reached_layers()) == 3
    source = zero_removed(raw, config)
    out = Prune(config).run(source, None)
    assert "removed 4/8 channels of /features/Conv" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    feeds = {
        "x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32),
        "rois": np.array([[0, 1, 0, 5, 7], [1, 0, 2, 6, 6], [0, 2, 2, 7, 7]], np.float32),
    }
    expected, before = run(source, feeds), run(raw, feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to_keeps_a_multiple_of_it_in_every_group(scope: str):
    """resnet18 at 0.3 keeps 45 of 64 channels; roundTo 8 keeps 48 (rounded up)."""
    case = build("resnet18", 17)
    config = PruneConfig.model_validate({"sparsity": 0.3, "roundTo": 8, "scope": scope})
    assert config.round_to == 8
    copy = onnx.load_from_string(case.model.SerializeToString())
    exact = plan_structured(copy, PruneConfig(sparsity=0.3, scope=scope), set(), [])
    work = onnx.ModelProto()
    work.CopyFrom(case.model)
    plan = plan_structured(work, config, set(), [])
    assert plan is not None and exact is not None
    kept = {
        grp.root: len(grp.units) - len(plan.chosen.get(grp.root, []))
        for grp in plan.groups.prunable
    }
    assert all(k % 8 == 0 for k in kept.values()), kept
    if scope == "layer":
        assert sorted(set(kept.values())) == [48, 96, 184, 360]  # 45, 90, 179, 358 exact
    removed = sum(len(u) for u in plan.chosen.values())
    assert 0 < removed < sum(len(u) for u in exact.chosen.values())
    out = Prune(config).run(case.model, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
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


class ConstantChannels(torch.nn.Module):
    """The odd channels of conv1 and neurons of fc1 are constant after their ReLU (zero
    weights, a positive bias) and read through small weights, so L1 removes them first;
    conv2 has no bias of its own, and its odd channels are always zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1, bias=False)
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 4)
        with torch.no_grad():
            for layer, bias in ((self.conv1, 0.3), (self.fc1, 0.2)):
                layer.weight[1::2] = 0.0
                layer.bias[1::2] = bias
            self.conv2.weight[1::2] = 0.0
            for reader in (self.conv2, self.fc2):
                reader.weight[:, 1::2] *= 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))


@pytest.mark.parametrize("compensate", [True, False])
def test_removed_constant_channels_leave_their_mean_in_the_next_bias(compensate: bool):
    """A removed channel that is constant after its ReLU still fed the next layer: with
    its mean put into that layer's bias (one added where the Conv had none) the pruned
    model computes exactly the source's function; cut bare, it does not."""
    torch.manual_seed(0)
    model = export(ConstantChannels(), (torch.randn(1, 3, 4, 4),), ["input"], 17)
    data = Dataset({"input": RNG.normal(size=(16, 3, 4, 4)).astype(np.float32)}, None, "calib")
    config = PruneConfig(sparsity=0.5, calibration_samples=8, compensate_bias=compensate)
    out = Prune(config).run(model, calibration_context(model, data))
    onnx.checker.check_model(out.model, full_check=True)
    conv2 = next(n for n in out.model.graph.node if n.op_type == "Conv" and "conv2" in n.name)
    feeds = {"input": RNG.normal(size=(4, 3, 4, 4)).astype(np.float32)}
    got, want = run(out.model, feeds), run(model, feeds)
    if compensate:
        assert "added the removed channels' mean input to the bias of 3 layers" in out.notes
        assert len(conv2.input) == 3  # conv2 gained a bias
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:
        assert "channel means from 8 samples of calib" not in out.notes
        assert len(conv2.input) == 2
        assert np.abs(got - want).max() > 1e-3


def test_activation_importance_and_bias_compensation_share_one_calibration_pass(monkeypatch):
    """Both read the channel moments of the same layer inputs over the same samples:
    they are measured once per prune step, not once for each."""
    passes: list[int] = []
    measure = prune_importance.channel_moments

    def counted(*args, **kwargs):
        passes.append(len(args[1]))
        return measure(*args, **kwargs)

    monkeypatch.setattr(prune_importance, "channel_moments", counted)
    torch.manual_seed(0)
    model = export(ConstantChannels(), (torch.randn(1, 3, 4, 4),), ["input"], 17)
    data = Dataset({"input": RNG.normal(size=(16, 3, 4, 4)).astype(np.float32)}, None, "calib")
    config = PruneConfig(sparsity=0.5, criterion="activation", calibration_samples=8)
    out = Prune(config).run(model, calibration_context(model, data))
    assert "activation importance from 8 samples of calib" in out.notes
    assert any("mean input to the bias of" in n for n in out.notes), out.notes
    assert len(passes) == 1, passes
    onnx.checker.check_model(out.model, full_check=True)


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
    notes: list[str] = []
    plan = planned(model, config, notes)
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 5, notes
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 4/8 channels of /a/Conv, /b/Conv") for n in out.notes)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"input": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(out.model, feeds), run(source, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_shufflenet_channel_shuffles_become_gathers_and_prune_exactly(opset: int):
    """ShuffleNetV2 after `simplify` (which folds the shuffles' shapes to constants):
    every shuffle is written as a Gather of its channels, so the interleaved streams
    prune like any other layer instead of collapsing into one unprunable group."""
    torch.manual_seed(0)
    module = torchvision.models.shufflenet_v2_x0_5(num_classes=10, weights=None)
    with torch.no_grad():  # an untrained net's output hardly depends on any one channel
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.05, 0.2)
    raw = export(module, (torch.randn(1, 3, 64, 64),), ["input"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    plan = planned(model, config, notes)
    assert any(n.startswith("16 channel shuffles") for n in notes), notes
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 57, notes

    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    onnx.checker.check_model(out.model, full_check=True)
    after = g.weight_stats(out.model)[0]
    assert after == plan.predicted
    assert plan.before / after >= 1.8
    assert sum(n.op_type == "Gather" for n in out.model.graph.node) == 16
    # The raw export, whose shuffles compute their shapes from Shape: the step
    # simplifies it first by itself and reaches the same layers.
    raw_out = Prune(config).run(raw, None)
    assert any(n.startswith("simplified first") for n in raw_out.notes), raw_out.notes
    assert any(n.startswith("structured: 57/57 layers pruned") for n in raw_out.notes)
    feeds = {"input": RNG.normal(size=(2, 3, 64, 64)).astype(np.float32)}
    expected, before = run(source, feeds), run(model, feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(
        run(out.model, feeds), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
    )


@pytest.mark.parametrize("opset", [14, 17])  # the attention exports from opset 14
def test_vit_multihead_attention_heads_and_hidden_width_prune(opset: int):
    """torchvision's VisionTransformer, whose nn.MultiheadAttention packs Q, K and V
    in one projection (split by Reshape [S, B, 3, E] and three Gathers) and folds the
    heads into the batch axis ([S, B*H, D], Transpose, [B, H, S, D]); after
    `simplify`. The hidden width is one group with the class token (an Expand of a
    constant over the batch, concatenated to the patches) and the position
    embedding: every layer is reached. With the patch embedding (the width's
    producer) excluded, heads and FFN neurons prune exactly."""
    torch.manual_seed(0)
    module = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )
    with torch.no_grad():  # torchvision starts biases and the head at zero
        for mha in (m for m in module.modules() if isinstance(m, torch.nn.MultiheadAttention)):
            mha.in_proj_bias.uniform_(-0.5, 0.5)
            mha.out_proj.bias.uniform_(-0.5, 0.5)
        for linear in (m for m in module.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.mul_(4)
        module.heads.head.weight.normal_(0, 0.2)
    raw = export(module, (torch.randn(1, 3, 32, 32),), ["input"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    feeds = {"input": RNG.normal(size=(3, 3, 32, 32)).astype(np.float32)}

    whole = PruneConfig(sparsity=0.5)
    plan = planned(model, whole, [])
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 10
    out = Prune(whole).run(model, None)
    assert any(n.startswith("removed 32/64 hidden channels of /conv_proj/Conv") for n in out.notes)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    assert plan.before / plan.predicted >= 3  # heads and FFN alone gave 1.7x
    shapes = {t.name: tuple(t.dims) for t in out.model.graph.initializer}
    assert shapes["class_token"] == (1, 1, 32)
    assert shapes["encoder.pos_embedding"] == (1, 17, 32)
    assert run(out.model, feeds).shape == (3, 10)

    config = PruneConfig(sparsity=0.5, exclude_nodes=["/conv_proj/Conv"])
    plan = planned(model, config, [])
    assert len(plan.groups.reached_layers()) == 8
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    for layer in (0, 1):
        attention = f"/encoder/layers/encoder_layer_{layer}/self_attention/MatMul"
        assert f"removed 2/4 heads of {attention}" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    expected, before = run(source, feeds), run(model, feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-5)


class TokenNet(torch.nn.Module):
    """Patches, a learned class token expanded over the batch and put in front of
    them (`tokens` times: DeiT's class and distillation tokens, which start equal
    and so are exported as one Expand read twice), a position embedding, and a
    head that reads the first token's row."""

    def __init__(self, width_from_data: bool, tokens: int = 1) -> None:
        super().__init__()
        self.width_from_data, self.tokens = width_from_data, tokens
        self.embed = torch.nn.Conv2d(3, 16, 4, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.pos = torch.nn.Parameter(torch.randn(1, 16 + tokens, 16))
        self.fc, self.head = torch.nn.Linear(16, 24), torch.nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        width = t.shape[-1] if self.width_from_data else -1
        token = self.cls.expand(x.shape[0], -1, width)
        t = torch.cat([token] * self.tokens + [t], 1) + self.pos
        return self.head(torch.relu(self.fc(t))[:, 0])


@pytest.mark.parametrize(("opset", "tokens"), [(11, 1), (13, 2), (17, 1)])
def test_an_expanded_class_token_joins_the_width_only_where_its_channel_axis_stays(
    opset: int, tokens: int
):
    """expand(B, -1, -1) leaves the channel axis at the constant's own width (the
    exporter writes it as Where(shape == -1, 1, shape)), so the token's columns are
    cut with the patches' and the cut is exact where removed channels were zero.
    expand(B, -1, C) with C the data's width spells the width out: it stays whole."""
    torch.manual_seed(0)
    raw = export(TokenNet(False, tokens), (torch.randn(2, 3, 16, 16),), ["input"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    assert len(plan.groups.reached_layers()) == 3
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 8/16 channels of /embed/Conv") for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"input": RNG.normal(size=(3, 3, 16, 16)).astype(np.float32)}
    expected = run(source, feeds)
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    spelled = export(TokenNet(True, tokens), (torch.randn(2, 3, 16, 16),), ["input"], opset)
    simplified = Simplify(SimplifyConfig()).run(spelled, None).model  # type: ignore[arg-type]
    notes: list[str] = []
    plan = planned(simplified, config, notes)
    assert len(plan.groups.reached_layers()) == 2
    assert any(n.startswith("skipped /embed/Conv:") and "not tracked" in n for n in notes), notes
    out = Prune(config).run(simplified, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert run(out.model, feeds).shape == (3, 5)


@pytest.mark.parametrize("opset", [14, 17])
def test_swin_windows_heads_and_stage_widths_prune(opset: int):
    """A small torchvision SwinTransformer after `simplify`: window partition and
    reverse (Reshape/Transpose over the axes before the channels), shifted windows
    (Slice + Concat on H and W), a packed Q/K/V projection split [.., 3, H, D] and
    picked apart, a relative position bias per head, patch merging. With the stage
    widths (LayerNorm-normalized, so not exact) excluded, heads and FFN neurons
    prune exactly; with them, every layer is reached and the graph stays valid."""
    torch.manual_seed(0)
    module = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4]
    )
    with torch.no_grad():
        for linear in (m for m in module.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.mul_(4)
            if linear.bias is not None:
                linear.bias.uniform_(-0.3, 0.3)
    raw = export(module, (torch.randn(1, 3, 32, 32),), ["input"], opset)
    model = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    feeds = {"input": RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)}

    whole = PruneConfig(sparsity=0.5)
    plan = planned(model, whole, [])
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 19
    out = Prune(whole).run(model, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    assert plan.before / plan.predicted >= 1.8
    assert run(out.model, feeds).shape == (2, 1000)

    stems = [n.name for n in model.graph.node if n.name.endswith(("reduction/MatMul", "0.0/Conv"))]
    assert len(stems) == 2  # the patch embedding and the one patch merging
    config = PruneConfig(sparsity=0.5, exclude_nodes=stems)
    plan = planned(model, config, [])
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    for stage, heads in ((1, 2), (3, 4)):
        for block in (0, 1):
            attention = f"/features/features.{stage}/features.{stage}.{block}/attn/MatMul"
            assert f"removed {heads // 2}/{heads} heads of {attention}" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    expected, before = run(source, feeds), run(model, feeds)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(before).max()
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-5)


class FPN(torch.nn.Module):
    """A DBNet-style neck: strided convs, 1x1 laterals merged top-down by Add with
    F.interpolate(size=...) and the levels concatenated for the head. `size` reads H
    and W of a tensor (Shape -> Slice [-2:] or Gather 2, 3), and the interpolation
    itself reads N and C of its input (Concat(Shape(x)[0:2], size) -> Resize(x)
    sizes): neither reads a channel count that pruning could break."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 8, 3, 2, 1),
            nn.Conv2d(8, 16, 3, 2, 1),
            nn.Conv2d(16, 32, 3, 2, 1),
        )
        self.lat1, self.lat2, self.lat3 = (
            nn.Conv2d(8, 8, 1),
            nn.Conv2d(16, 8, 1),
            nn.Conv2d(32, 8, 1),
        )
        self.head = nn.Conv2d(24, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        c1 = torch.relu(self.c1(x))
        c2 = torch.relu(self.c2(c1))
        c3 = torch.relu(self.c3(c2))
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + f.interpolate(p3, size=c2.shape[-2:], mode="nearest")
        p1 = self.lat1(c1) + f.interpolate(p2, size=(c1.shape[2], c1.shape[3]), mode="nearest")
        size = (p1.shape[2], p1.shape[3])
        levels = [p1, f.interpolate(p2, size=size), f.interpolate(p3, size=size)]
        return self.head(torch.cat(levels, 1))


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_shapes_that_read_only_other_dims_leave_an_fpn_prunable(opset: int):
    torch.manual_seed(0)
    model = export(FPN(), (torch.randn(1, 3, 32, 32),), ["input"], opset)
    g.constants_to_initializers(model)
    assert sum(n.op_type == "Shape" for n in model.graph.node) >= 4
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    plan = planned(model, config, notes)
    assert len(plan.groups.reached_layers()) == len(plan.groups.d.layers) == 7, notes
    assert [n for n in notes if n.startswith("skipped")] == [
        "skipped /head/Conv: its output is a graph output"
    ]
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert "removed 4/8 channels of /lat3/Conv, /lat2/Conv, /lat1/Conv" in out.notes, out.notes
    assert "removed 8/16 channels of /c2/Conv" in out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"input": RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)}
    expected = run(source, feeds)
    assert np.abs(expected - run(model, feeds)).max() > 1e-3  # the zeroed channels mattered
    np.testing.assert_allclose(run(out.model, feeds), expected, rtol=1e-4, atol=1e-5)


def test_a_shape_sliced_to_its_spatial_dims_does_not_read_the_channels():
    """Hand-written: sizes = Concat(Shape(y)[0:2], Shape(y)[2:4] * 2) -> Resize(y)."""
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    w = RNG.normal(size=(8, 3, 1, 1)).astype(np.float32)
    w[1::2] = 0  # the channels l1 removes write nothing
    inits = [
        numpy_helper.from_array(w, "a.w"),
        numpy_helper.from_array(RNG.normal(size=(4, 8, 1, 1)).astype(np.float32), "b.w"),
        ints("zero", [0]), ints("two", [2]), ints("four", [4]), ints("twice", [2]),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["y"], name="a"),
        helper.make_node("Shape", ["y"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "two"], ["nc"], name="nc"),
        helper.make_node("Slice", ["shape", "two", "four"], ["hw"], name="hw"),
        helper.make_node("Mul", ["hw", "twice"], ["hw2"], name="hw2"),
        helper.make_node("Concat", ["nc", "hw2"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["y", "", "", "sizes"], ["up"], name="up", mode="nearest"),
        helper.make_node("Conv", ["up", "b.w"], ["out"], name="b"),
    ]
    graph = helper.make_graph(
        nodes,
        "sliced",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    out = Prune(PruneConfig(sparsity=0.5)).run(model, None)
    assert "removed 4/8 channels of a" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    feeds = {"x": RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(out.model, feeds), run(model, feeds), rtol=1e-4, atol=1e-5)


def test_a_shape_that_reads_the_channel_count_blocks_until_folded():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            return self.b(y / y.shape[1])

    model = export(Scaled(), (torch.randn(1, 3, 4, 4),), ["input"], 17)
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    assert plan_structured(work, config, set(), notes) is None
    assert any(n.startswith("skipped /a/Conv: its channel count is read by Shape") for n in notes)

    # The step folds that read into the constant it is over fixed dims (8) first, as
    # the simplify step would: dividing by 8 is what the source does, so /a/Conv
    # prunes and, where the removed channels were zero, nothing changes.
    out = Prune(config).run(model, None)
    assert any(n.startswith("simplified first") for n in out.notes), out.notes
    assert any(n.startswith("removed 4/8 channels of /a/Conv") for n in out.notes), out.notes
    simplified = Simplify(SimplifyConfig()).run(model, None).model  # type: ignore[arg-type]
    feeds = {"input": RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)}
    same_cut = Prune(config).run(simplified, None).model
    np.testing.assert_allclose(run(out.model, feeds), run(same_cut, feeds), rtol=1e-6)
    source = zero_removed(simplified, config)
    exact = Prune(config).run(source, None).model
    np.testing.assert_allclose(run(exact, feeds), run(source, feeds), rtol=1e-5, atol=1e-6)


class SegFormerStage(torch.nn.Module):
    """SegFormer's stage: patches to a sequence, LayerNorm, an MLP on a residual, and
    back to a map by `reshape(n, h, w, -1)` with n, h and w read by Shape."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 3, 2, 1)
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 16)
        self.out = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        n, _, h, w = y.shape
        t = self.norm(y.flatten(2).transpose(1, 2))
        t = t + self.fc(t)
        return self.out(t.reshape(n, h, w, -1).permute(0, 3, 1, 2))


@pytest.mark.parametrize("opset", [13, 17])
def test_simplify_folds_the_shapes_of_opset_17_layer_norm_graphs(opset: int):
    """onnxslim's own shape inference fails on graphs with LayerNormalization
    (opset 17 on) and it then folds no Shape behind a computed Reshape target;
    `simplify` gives it the shapes first, so the sequence-to-map Reshape becomes a
    constant. The batch stays dynamic and the function is unchanged. The prune
    step no longer needs that fold here: the flatten reads its own channel count
    ([N, C, -1] from Shape), which follows the kept count at run time, so the raw
    graph prunes the whole width as it is, to what the simplified graph prunes to."""
    torch.manual_seed(0)
    raw = export(SegFormerStage(), (torch.randn(2, 3, 16, 16),), ["input"], opset)
    simplified = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    assert not [n for n in simplified.graph.node if n.op_type == "Shape"]
    for batch in (1, 3):
        feeds = {"input": RNG.normal(size=(batch, 3, 16, 16)).astype(np.float32)}
        np.testing.assert_allclose(run(simplified, feeds), run(raw, feeds), rtol=1e-5, atol=1e-6)

    config = PruneConfig(sparsity=0.5)
    plan = planned(simplified, config, [])
    out = Prune(config).run(raw, None)
    assert not any(n.startswith("simplified first") for n in out.notes), out.notes
    assert any(n.startswith("structured: 3/3 layers pruned") for n in out.notes), out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    same_cut = Prune(config).run(simplified, None).model
    for batch in (1, 3):
        feeds = {"input": RNG.normal(size=(batch, 3, 16, 16)).astype(np.float32)}
        np.testing.assert_allclose(
            run(out.model, feeds), run(same_cut, feeds), rtol=1e-5, atol=1e-6
        )
    assert run(out.model, feeds).shape == (3, 4, 8, 8)


def test_simplify_goes_on_without_symbolic_shapes_past_their_deadline(monkeypatch):
    """onnxruntime's symbolic shape inference runs in a child that is killed at its
    deadline (sympy ran for over 25 minutes on torchvision's Faster R-CNN): past it,
    onnxslim simplifies with its own inference, here leaving the Shape nodes the
    symbolic shapes would have folded, and the function unchanged."""
    from edgeslim.compressor import shape_inference

    torch.manual_seed(0)
    raw = export(SegFormerStage(), (torch.randn(2, 3, 16, 16),), ["input"], 17)
    assert shape_inference.infer_symbolic_shapes(raw) is not None
    assert shape_inference.infer_symbolic_shapes(raw, deadline=0.01) is None
    monkeypatch.setattr(shape_inference, "DEADLINE_SECONDS", 0.01)
    simplified = Simplify(SimplifyConfig()).run(raw, None).model  # type: ignore[arg-type]
    assert [n for n in simplified.graph.node if n.op_type == "Shape"]
    feeds = {"input": RNG.normal(size=(3, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(simplified, feeds), run(raw, feeds), rtol=1e-5, atol=1e-6)


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
    """Self-attention written with explicit head sizes in its reshapes (view(b, s, 4, 8)
    and reshape(b, s, 32)), or with the head count alone (view(b, s, 4, -1) and
    reshape(b, s, -1), as DeBERTa writes them)."""

    def __init__(self, head_size: int = 8) -> None:
        super().__init__()
        self.head_size = head_size
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_size

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, 4, d).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
        return self.o((a @ v).transpose(1, 2).reshape(b, s, 4 * d if d > 0 else -1))


@pytest.mark.parametrize("dynamic", [False, True], ids=["constant-shapes", "computed-shapes"])
@pytest.mark.parametrize("head_size", [8, -1])
def test_head_count_constants_in_reshapes_follow_the_pruned_heads(dynamic: bool, head_size: int):
    torch.manual_seed(0)
    module = Attention(head_size).eval()
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


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_magnitude_importance_counts_the_consumers_input_weights(criterion: str):
    """Group magnitude (as Torch-Pruning's): conv1's channels all write the same
    weights, but conv2 reads the even ones with weights 100x smaller, so those are
    the ones that go. By the producers' output weights alone all would tie."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 4),
    )
    with torch.no_grad():
        module[0].weight[:] = module[0].weight[0].clone()
        module[0].bias[:] = module[0].bias[0].clone()
        module[2].weight[:, 0::2] *= 0.01
    model = export(module, (torch.randn(1, 3, 8, 8),), ["input"], 17)
    out = Prune(PruneConfig(sparsity=0.5, criterion=criterion)).run(model, None)
    convs = [n for n in out.model.graph.node if n.op_type == "Conv"]
    inits = {t.name: numpy_helper.to_array(t) for t in out.model.graph.initializer}
    kept = inits[convs[1].input[1]]
    assert kept.shape[1] == 4
    # the odd input columns (conv1's odd channels) stay: all of the large ones
    source = np.abs(module[2].weight.detach().numpy()).mean((0, 2, 3))
    column = np.abs(kept).mean((0, 2, 3))
    assert column.min() > 10 * source[0::2].max()
