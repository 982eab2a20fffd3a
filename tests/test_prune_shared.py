"""Structured pruning of detection heads and other layers that share one weight.

A detection head run on every FPN level (RetinaNet, FCOS, Faster R-CNN's RPN)
and ALBERT's repeated layer read each weight from several nodes. Their channels
are one unit in all of those nodes: the weight is cut once and stays shared, so
the pruned model keeps the structure (and the size) of the source's tying.
FCOS's and RetinaNet v2's towers normalize with GroupNorm, whose statistics
are per group: there a unit is a whole group. Exports as torch's dynamo
exporter writes them (allowzero on every Reshape, a fixed batch, `as_strided`
as a Gather) are followed too.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeslim.api.spec import PruneConfig, SimplifyConfig
from edgeslim.compressor import graph as g
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.prune import Prune
from edgeslim.compressor.simplify import Simplify
from tests.archs import export, export_dynamo, tiny_albert
from tests.test_prune_groups import (
    RNG,
    assert_exact,
    calibration_context,
    padded_text,
    planned,
    run,
    zero_removed,
)

pytest.importorskip("transformers")


def readers(model: onnx.ModelProto, weight: str) -> list[str]:
    return [n.name for n in model.graph.node if weight in n.input]


class SharedHead(torch.nn.Module):
    """Three backbone stages, a lateral 1x1 conv per level, and one head (a tower of
    two convs with ReLU, the second without a bias, then a classifier conv) run on
    every level, as RetinaNet's head is: each head weight is read by three Convs."""

    def __init__(self, kernel: int = 3, group_norm: bool = False) -> None:
        super().__init__()
        widths = (8, 12, 16)
        self.stages = torch.nn.ModuleList(
            torch.nn.Conv2d(c_in, c, 3, stride=2, padding=1)
            for c_in, c in zip((3, *widths[:-1]), widths, strict=True)
        )
        self.laterals = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 1) for c in widths)
        pad = kernel // 2
        self.tower1 = torch.nn.Conv2d(16, 16, kernel, padding=pad)
        self.tower2 = torch.nn.Conv2d(16, 16, kernel, padding=pad, bias=False)
        self.cls = torch.nn.Conv2d(16, 6, kernel, padding=pad)
        # FCOS's and RetinaNet v2's towers normalize with GroupNorm (shared too).
        self.norm = torch.nn.GroupNorm(4, 16) if group_norm else torch.nn.Identity()
        if group_norm:
            with torch.no_grad():  # as training leaves them
                self.norm.weight.normal_(1.0, 0.2)
                self.norm.bias.normal_(0.0, 0.2)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(torch.relu(self.tower2(torch.relu(self.norm(self.tower1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        for stage, lateral in zip(self.stages, self.laterals, strict=True):
            x = torch.relu(stage(x))
            levels.append(self.head(lateral(x)).flatten(2))
        return torch.cat(levels, 2)


HEAD_WEIGHTS = ("tower1.weight", "tower2.weight", "cls.weight")


@pytest.mark.parametrize("opset", [11, 17])
def test_a_head_shared_by_every_fpn_level_prunes_once_for_all_of_them(opset: int):
    """The tower's channels are one unit on all three levels, and the lateral convs
    that feed the shared tower become one group. Before, every head conv was skipped
    ("its weight is shared with other nodes") and 9 of 15 layers were pruned."""
    torch.manual_seed(0)
    model = export(SharedHead(), (torch.randn(1, 3, 32, 32),), ["input"], opset)
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    # The classifier's output is the prediction; every other layer is reached.
    assert len(plan.groups.d.layers) == 15
    assert len(plan.groups.reached_layers()) == 15
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    notes = out.notes
    assert "removed 8/16 channels of /tower1/Conv, /tower1_1/Conv, /tower1_2/Conv" in notes, notes
    assert "removed 8/16 channels of /laterals.0/Conv, /laterals.1/Conv, /laterals.2/Conv" in notes
    assert "structured: 15/15 layers pruned (15 reached by a prunable group)" in notes[-1]
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    # Each head weight is still one initializer, read by the three levels' convs.
    inits = {t.name: numpy_helper.to_array(t) for t in out.model.graph.initializer}
    for weight in HEAD_WEIGHTS:
        assert len(readers(out.model, weight)) == 3
    assert inits["tower1.weight"].shape == (8, 8, 3, 3)
    assert inits["cls.weight"].shape == (6, 8, 3, 3)
    feeds = {"input": RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)}
    assert_exact(out.model, source, model, feeds)


@pytest.mark.parametrize("opset", [11, 17])
def test_group_norm_removes_whole_groups(opset: int):
    """torch exports GroupNorm as Reshape to [0, G, -1], InstanceNormalization with a
    scale and bias per group, Reshape back to Shape(x), then the per-channel Mul and
    Add. Removing whole groups leaves the others' statistics as they were, so the
    result is exact; G and the InstanceNormalization's scale and bias follow. Before,
    the tower stopped at the first Reshape ("a target shape that cannot be followed")."""
    torch.manual_seed(0)
    model = export(SharedHead(group_norm=True), (torch.randn(1, 3, 32, 32),), ["input"], opset)
    g.constants_to_initializers(model)
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    assert len(plan.groups.reached_layers()) == 15
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    tower1 = "/tower1/Conv, /tower1_1/Conv, /tower1_2/Conv"
    assert f"removed 2/4 GroupNorm groups of {tower1}" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    splits = [n for n in out.model.graph.node if n.name.startswith("/norm/Reshape")]
    targets = {tuple(numpy_helper.to_array(t)) for t in out.model.graph.initializer if any(
        t.name == n.input[1] for n in splits
    )}  # fmt: skip
    assert targets == {(0, 2, -1)}
    feeds = {"input": RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)}
    assert_exact(out.model, source, model, feeds)


def test_group_norm_from_torchs_default_exporter_with_a_dynamic_batch():
    """With a dynamic batch torch's dynamo exporter writes the way back as
    Reshape(.., Shape(x, start=0)): all of x's shape, so the GroupNorm rule follows
    it as before (PoolFormer so exported: 8 of 13 layers, now 13). Exact at two
    batch sizes."""
    torch.manual_seed(0)
    model = export_dynamo(SharedHead(group_norm=True), (torch.randn(2, 3, 32, 32),), ["input"])
    g.constants_to_initializers(model)
    assert any(n.op_type == "Shape" and n.attribute for n in model.graph.node)
    config = PruneConfig(sparsity=0.5)
    plan = planned(model, config, [])
    assert len(plan.groups.reached_layers()) == 15
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert sum("GroupNorm groups of" in n for n in out.notes) == 1, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    for batch in (1, 3):
        feeds = {"input": RNG.normal(size=(batch, 3, 32, 32)).astype(np.float32)}
        assert_exact(out.model, source, model, feeds)


def as_dynamo_writes_it(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """`model` as torch's dynamo exporter writes it from a static example: the batch
    fixed in the inputs and outputs and in every Reshape target that copied it (0),
    and allowzero set on every Reshape."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in (*out.graph.input, *out.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]]).copy()
            target[target == 0] = batch
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))
            kept = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("allowzero", 1)])
    return out


def test_reshapes_with_allowzero_and_a_fixed_batch_are_followed():
    """torch's dynamo exporter (the default of torch.onnx.export from torch 2.9) sets
    allowzero on every Reshape and writes the batch of the example. allowzero only
    changes what a 0 in the target means, so where there is none it is cleared and
    the GroupNorm and Flatten rules follow the Reshapes as before; before, every one
    blocked ("uses allowzero": torchvision's resnet18 so exported reached 20 of 21
    layers, 2.4x at 0.5, instead of 21, 4.0x)."""
    torch.manual_seed(0)
    plain = export(SharedHead(group_norm=True), (torch.randn(1, 3, 32, 32),), ["input"], 17)
    g.constants_to_initializers(plain)
    model = as_dynamo_writes_it(plain, batch=1)
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    plan = planned(model, config, notes)
    assert "allowzero cleared on 3 Reshapes whose target has no 0" in notes, notes
    assert len(plan.groups.reached_layers()) == 15
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(n.startswith("removed 2/4 GroupNorm groups of /tower1/Conv") for n in out.notes)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    feeds = {"input": RNG.normal(size=(1, 3, 32, 32)).astype(np.float32)}
    assert_exact(out.model, source, model, feeds)


def pooled_as_strided(
    flat: list[int], index: list[onnx.TensorProto], nodes: list[onnx.NodeProto], batch: int | str
) -> onnx.ModelProto:
    """Conv, ReLU, global pool, then dynamo's `as_strided` of the pooled map: Reshape
    to `flat` and a Gather by the tensor "every" (from `index` and `nodes`), then a
    1x1 conv; the batch is `batch` (a name: dynamic)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=(8,)).astype(np.float32)
    w2 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(np.array(flat, np.int64), "flat"),
        numpy_helper.from_array(w2, "w2"),
        *index,
    ]
    make = onnx.helper.make_node
    nodes = [
        *nodes,
        make("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1] * 4),
        make("Relu", ["c"], ["r"], name="relu"),
        make("GlobalAveragePool", ["r"], ["p"], name="pool"),
        make("Reshape", ["p", "flat"], ["v"], name="view", allowzero=1),
        make("Gather", ["v", "every"], ["s"], name="as_strided", axis=0),
        make("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    value = onnx.helper.make_tensor_value_info
    x = value("x", onnx.TensorProto.FLOAT, [batch, 3, 8, 8])
    y = value("y", onnx.TensorProto.FLOAT, [batch, 4, 1, 1])
    graph = onnx.helper.make_graph(nodes, "dynamo", [x], [y], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_a_gather_of_every_element_in_order_is_followed_as_a_reshape():
    """torch's dynamo exporter writes ConvNeXt's `as_strided` on the pooled map as a
    flattening Reshape and a Gather of arange(C) shaped [1, C, 1, 1]: every element
    once, in order, so it is written as the Reshape it is and the channels follow
    (convnext_tiny so exported: 59 of 59 layers, 3.9x at 0.5, instead of 55, 2.5x)."""
    every = np.arange(8, dtype=np.int64).reshape(1, 8, 1, 1)
    model = pooled_as_strided([8], [numpy_helper.from_array(every, "every")], [], 1)
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    planned(model, config, notes)
    assert "1 Gathers that pick every element in order written as Reshapes" in notes, notes
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert "removed 4/8 channels of conv1" in out.notes, out.notes
    onnx.checker.check_model(out.model, full_check=True)
    feeds = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    assert_exact(out.model, source, model, feeds)


def test_a_gather_of_every_element_computed_at_run_time_is_followed_as_a_reshape():
    """With a dynamic batch the same `as_strided` index is computed: Range(0, B) * C,
    unsqueezed, plus arange(C) shaped [1, C, 1, 1]. Found to be every element in
    order at two batch sizes, the Gather becomes Reshape(flat, Shape(pooled)), a run
    that reads its sizes from the pooled map itself, and the index arithmetic goes
    (convnext_tiny exported with a dynamic batch: 59 of 59 layers, 3.9x at 0.5,
    instead of 55, 2.5x). Exact at batch 1 and 3."""
    index = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(8, np.int64), "width"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.arange(8, dtype=np.int64).reshape(1, 8, 1, 1), "within"),
    ]
    make = onnx.helper.make_node
    arithmetic = [
        make("Shape", ["x"], ["lead"], start=0, end=1),
        make("Squeeze", ["lead"], ["batch"]),
        make("Range", ["zero", "batch", "one"], ["rows"]),
        make("Mul", ["rows", "width"], ["starts"]),
        make("Unsqueeze", ["starts", "axes"], ["starts4"]),
        make("Add", ["starts4", "within"], ["every"]),
    ]
    model = pooled_as_strided([-1], index, arithmetic, "batch")
    config = PruneConfig(sparsity=0.5)
    notes: list[str] = []
    planned(model, config, notes)
    assert "1 Gathers that pick every element in order written as Reshapes" in notes, notes
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert "removed 4/8 channels of conv1" in out.notes, out.notes
    assert not {"Range", "Gather"} & {n.op_type for n in out.model.graph.node}
    onnx.checker.check_model(out.model, full_check=True)
    for batch in (1, 3):
        feeds = {"x": RNG.normal(size=(batch, 3, 8, 8)).astype(np.float32)}
        assert_exact(out.model, source, model, feeds)


def test_a_shared_layer_read_where_its_input_cannot_be_cut_keeps_its_inputs():
    """One head applied to a level that comes straight from a graph input: that
    reader's input channels cannot go, so neither can the shared weight's, for any
    reader; its output channels still can."""

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lateral = torch.nn.Conv2d(3, 16, 1)
            self.head = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.out = torch.nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            a = self.out(torch.relu(self.head(self.lateral(x))))
            b = self.out(torch.relu(self.head(level)))
            return a + b

    torch.manual_seed(0)
    args = (torch.randn(1, 3, 8, 8), torch.randn(1, 16, 8, 8))
    model = export(Mixed(), args, ["x", "level"], 17)
    config = PruneConfig(sparsity=0.5)
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    assert any(
        n.startswith("skipped /lateral/Conv: its weight is shared by 2 layers and only 1")
        for n in out.notes
    ), out.notes
    assert "removed 8/16 channels of /head/Conv, /head_1/Conv" in out.notes, out.notes
    inits = {t.name: numpy_helper.to_array(t) for t in out.model.graph.initializer}
    assert inits["head.weight"].shape == (8, 16, 3, 3)
    assert len(readers(out.model, "head.weight")) == 2
    feeds = {
        "x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32),
        "level": RNG.normal(size=(2, 16, 8, 8)).astype(np.float32),
    }
    np.testing.assert_allclose(run(out.model, feeds), run(source, feeds), rtol=1e-4, atol=1e-5)


def test_bias_compensation_of_a_shared_layer_keeps_one_shared_bias():
    """Each level's reader gets the mean of what the removed channels fed it, and
    readers that share a weight share one bias: the second tower conv, which had
    none, gains one bias for its three readers. The removed channels are constant
    here (zero weights, a positive bias), so the result is exact; 1x1 kernels, since
    zero padding at the borders makes any compensation approximate."""
    torch.manual_seed(0)
    module = SharedHead(kernel=1)
    with torch.no_grad():
        module.tower1.weight[1::2] = 0.0
        module.tower1.bias[1::2] = 0.3
        module.tower2.weight[1::2] = 0.0
        module.tower2.weight[:, 1::2] *= 0.1
        module.cls.weight[:, 1::2] *= 0.1
    model = export(module, (torch.randn(1, 3, 16, 16),), ["input"], 17)
    data = Dataset({"input": RNG.normal(size=(16, 3, 16, 16)).astype(np.float32)}, None, "calib")
    # The backbone and laterals stay, so that only the constant channels go.
    keep = [f"/stages.{i}/Conv" for i in range(3)] + [f"/laterals.{i}/Conv" for i in range(3)]
    config = PruneConfig(sparsity=0.5, calibration_samples=8, exclude_nodes=keep)
    out = Prune(config).run(model, calibration_context(model, data))
    assert "removed 8/16 channels of /tower1/Conv, /tower1_1/Conv, /tower1_2/Conv" in out.notes
    assert "removed 8/16 channels of /tower2/Conv, /tower2_1/Conv, /tower2_2/Conv" in out.notes
    assert "added the removed channels' mean input to the bias of 6 layers" in out.notes
    onnx.checker.check_model(out.model, full_check=True)
    tower2 = [n for n in out.model.graph.node if n.name.startswith("/tower2/Conv")]
    tower2 += [n for n in out.model.graph.node if n.name.startswith("/tower2_")]
    assert len(tower2) == 3 and len({n.input[2] for n in tower2}) == 1
    for weight in ("tower1.bias", "cls.bias", tower2[0].input[2], *HEAD_WEIGHTS):
        assert len(readers(out.model, weight)) == 3, weight
    feeds = {"input": RNG.normal(size=(4, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(out.model, feeds), run(model, feeds), rtol=1e-4, atol=1e-5)


# Excluded, they keep the LayerNorm-normalized widths, whose pruning is not exact.
ALBERT_WIDTHS = [
    "/albert/embeddings/word_embeddings/Gather",
    "/albert/encoder/embedding_hidden_mapping_in/MatMul",
]


def trained_like_albert(opset: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = tiny_albert(opset)
    with torch.no_grad():  # as training leaves them: no two LayerNorms or biases alike
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(0, 100, (2, 8))
    model = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], opset)
    g.constants_to_initializers(model)
    return model


def test_simplify_keeps_the_weights_albert_shares():
    """onnxslim writes a copy of a shared parameter per reader (ALBERT came out of the
    simplify step 74% larger: 44,288 parameters became 77,056); the step merges the
    copies back, so the simplified model is as small as the export and its layers
    still read one weight, which then prunes as one unit."""
    model = trained_like_albert(17)
    out = Simplify(SimplifyConfig()).run(model, None)  # type: ignore[arg-type]
    assert any(n.endswith("merged into it (shared)") for n in out.notes), out.notes
    assert g.weight_stats(out.model)[0] == g.weight_stats(model)[0] == 44_288
    query = "/albert/encoder/albert_layer_groups.0/albert_layers.0/attention/query/MatMul"
    weight = next(n.input[1] for n in out.model.graph.node if n.name == query)
    assert len(readers(out.model, weight)) == 2
    pruned = Prune(PruneConfig(sparsity=0.5)).run(out.model, None)
    assert any(n.startswith(f"removed 2/4 heads of {query}") for n in pruned.notes)
    assert len(readers(pruned.model, weight)) == 2


@pytest.mark.parametrize("opset", [13, 17])
def test_albert_layers_share_their_pruned_heads_and_ffn(opset: int):
    """ALBERT runs one layer's weights at every depth; the exporter writes the extra
    readers through Identity nodes. The heads and FFN neurons are cut once for both
    layers and the weights stay shared; before, each reader was given its own copy
    (43,712 parameters became 77,056 before any channel went). Untrained, the
    exporter also merges the ones and zeros of every LayerNorm and bias; those stay
    a copy per reader."""
    model = trained_like_albert(opset)
    config = PruneConfig(sparsity=0.5, exclude_nodes=ALBERT_WIDTHS)
    plan = planned(model, config, [])
    assert plan.before == g.weight_stats(model)[0]
    source = zero_removed(model, config)
    out = Prune(config).run(source, None)
    layer = "/albert/encoder/albert_layer_groups.0/albert_layers.0"
    for removed in ("2/4 heads of {}/attention/query", "64/128 neurons of {}/ffn"):
        assert any(n.startswith(f"removed {removed.format(layer)}/MatMul") for n in out.notes)
    onnx.checker.check_model(out.model, full_check=True)
    assert g.weight_stats(out.model)[0] == plan.predicted
    query = next(n for n in out.model.graph.node if n.name == f"{layer}/attention/query/MatMul")
    ffn = next(n for n in out.model.graph.node if n.name == f"{layer}/ffn/MatMul")
    for weight in (query.input[1], ffn.input[1]):
        assert len(readers(out.model, weight)) == 2  # both depths read the one weight
    inits = {t.name: numpy_helper.to_array(t) for t in out.model.graph.initializer}
    assert inits[query.input[1]].shape == (64, 32)
    assert inits[ffn.input[1]].shape == (64, 64)
    assert_exact(out.model, source, model, padded_text())
