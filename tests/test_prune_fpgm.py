"""criterion fpgm: units ranked by how far their weights point from the others' in
their group, so the redundant ones go first and BatchNorm folded into the weights
(a positive scale per channel) changes nothing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeslim.api.spec import PruneConfig
from edgeslim.compressor import graph as g
from edgeslim.compressor import prune_importance
from edgeslim.compressor.prune import Prune
from tests.test_prune_groups import ARCHS, build, export, prune_zeroed_exact_on, run

RNG = np.random.default_rng(0)


def two_convs(first: np.ndarray, second: np.ndarray, depthwise: bool = False) -> onnx.ModelProto:
    """conv(3 -> 8) -> ReLU -> [depthwise conv ->] conv(8 -> 4) -> global pool, with
    the given weights for the two dense convs."""
    torch.manual_seed(0)
    between = [torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)] if depthwise else []
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        *between,
        torch.nn.Conv2d(8, 4, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    with torch.no_grad():
        module[0].weight.copy_(torch.from_numpy(first))
        module[-3].weight.copy_(torch.from_numpy(second))
    return export(module, (torch.randn(1, 3, 8, 8),), ["input"], 17)


def weights(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def rescaled(model: onnx.ModelProto, scale: np.ndarray) -> onnx.ModelProto:
    """The same function with conv1's channel c (rows and bias) times scale[c] and
    conv2's input column c divided by it, as BatchNorm folding rescales channels."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    edits = {
        convs[0].input[1]: lambda w: w * scale[:, None, None, None],
        convs[0].input[2]: lambda b: b * scale,
        convs[1].input[1]: lambda w: w / scale[None, :, None, None],
    }
    for t in out.graph.initializer:
        if t.name in edits:
            t.CopyFrom(numpy_helper.from_array(edits[t.name](numpy_helper.to_array(t)), t.name))
    return out


def test_fpgm_ignores_a_positive_scale_per_channel_where_l1_does_not():
    """Folding a BatchNorm multiplies each channel's rows by gamma / std: the function
    is the same (ReLU passes a positive scale, the consumer's columns undo it), and so
    is fpgm's choice, while l1's follows the scale."""
    model = two_convs(
        RNG.normal(size=(8, 3, 3, 3)).astype(np.float32),
        RNG.normal(size=(4, 8, 3, 3)).astype(np.float32),
    )
    scale = np.array([8, 0.1, 5, 0.2, 3, 0.3, 6, 0.15], np.float32)
    scaled = rescaled(model, scale)
    feeds = {"input": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(scaled, feeds), run(model, feeds), rtol=1e-4, atol=1e-5)

    def pruned(m: onnx.ModelProto, criterion: str) -> np.ndarray:
        return run(Prune(PruneConfig(sparsity=0.5, criterion=criterion)).run(m, None).model, feeds)

    np.testing.assert_allclose(pruned(scaled, "fpgm"), pruned(model, "fpgm"), rtol=1e-4, atol=1e-5)
    assert np.abs(pruned(scaled, "l1") - pruned(model, "l1")).max() > 1e-2


@pytest.mark.parametrize("depthwise", [False, True])
def test_fpgm_removes_near_copies_first_where_l1_keeps_them(depthwise: bool):
    """Channels 0-3 are near-copies of one large filter (and read alike by conv2);
    4-7 are small but each its own. fpgm removes two of the copies, l1 two of the
    small ones. Through a depthwise conv, whose channels each read their own input,
    fpgm ranks the group as l1 does."""
    base = RNG.normal(size=(3, 3, 3))
    first = np.concatenate(
        [
            np.stack([5 * base + 0.05 * RNG.normal(size=base.shape) for _ in range(4)]),
            RNG.normal(size=(4, 3, 3, 3)),
        ]
    ).astype(np.float32)
    second = RNG.normal(size=(4, 8, 3, 3)).astype(np.float32)
    column = RNG.normal(size=(4, 3, 3))
    second[:, :4] = column[:, None] + 0.01 * RNG.normal(size=(4, 4, 3, 3))
    model = two_convs(first, second, depthwise)

    def copies_kept(criterion: str) -> int:
        out = Prune(PruneConfig(sparsity=0.25, criterion=criterion)).run(model, None).model
        rows = weights(out)[0].reshape(6, -1)
        cos = rows @ base.reshape(-1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(base)
        return int((cos > 0.99).sum())

    assert copies_kept("fpgm") == (4 if depthwise else 2)
    assert copies_kept("l1") == 4


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_fpgm_on_real_architectures_removes_zeroed_units_exactly(arch: str):
    """Units that write nothing score 0 and go first, so the result is exact."""
    case = build(arch, 17)
    config = PruneConfig(sparsity=0.5, criterion="fpgm")
    notes = prune_zeroed_exact_on(case.model, config, [case.feeds])
    assert any(n.startswith("structured:") for n in notes), notes


def test_fpgm_ranks_whole_heads_of_bert():
    """A head is one unit: its Q, K and V rows and output-projection columns side by
    side in each member. (The hidden width's LayerNorm makes BERT inexact anyway.)"""
    case = build("bert", 17)
    out = Prune(PruneConfig(sparsity=0.5, criterion="fpgm")).run(case.model, None)
    onnx.checker.check_model(out.model, full_check=True)
    assert sum(n.startswith("removed 2/4 heads of") for n in out.notes) == 2, out.notes
    assert g.weight_stats(case.model)[0] / g.weight_stats(out.model)[0] >= ARCHS["bert"][2]
    assert run(out.model, case.feeds).shape == run(case.model, case.feeds).shape


def test_fpgm_compares_a_wide_group_with_a_sample_of_it(monkeypatch: pytest.MonkeyPatch):
    """A group wider than FPGM_REFERENCES is compared with an evenly spaced sample of
    its units; the zeroed units still go first and the result is exact."""
    monkeypatch.setattr(prune_importance, "FPGM_REFERENCES", 16)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(12, 100), torch.nn.ReLU(), torch.nn.Linear(100, 4))
    model = export(module, (torch.randn(2, 12),), ["input"], 17)
    feeds = {"input": RNG.normal(size=(3, 12)).astype(np.float32)}
    prune_zeroed_exact_on(model, PruneConfig(sparsity=0.5, criterion="fpgm"), [feeds])
    out = Prune(PruneConfig(sparsity=0.5, criterion="fpgm")).run(model, None).model
    assert g.weight_stats(out)[0] < g.weight_stats(model)[0] * 0.6


def test_fpgm_is_for_structured_pruning_only():
    with pytest.raises(ValueError, match="criterion fpgm ranks channels: it needs method"):
        PruneConfig(method="magnitude", sparsity=0.5, criterion="fpgm")
