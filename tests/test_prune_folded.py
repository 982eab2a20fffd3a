"""Structured pruning of attention heads folded into the batch axis ([B*H, S, D]),
as exports with a dynamic batch write DeBERTa's attention (`prune_folded`).

Each case prunes a model whose removed units were zeroed first and checks that
the result computes the zeroed model's outputs at several batch sizes and
sequence lengths (the fold holds the batch, so one size proves little)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeslim.api.spec import PruneConfig
from edgeslim.compressor import graph as g
from edgeslim.compressor.prune import Prune, fold_shapes_if_it_helps
from tests.archs import (
    TorchAttention,
    export,
    export_dynamo,
    tiny_deberta_v2,
    tiny_deberta_v3,
)
from tests.test_prune_groups import prune_zeroed_exact_on, run

pytest.importorskip("transformers")

RNG = np.random.default_rng(0)
# (batch, sequence) pairs the pruned models must be exact at.
SIZES = [(2, 16), (3, 16), (3, 11), (1, 7)]


def word_embedding(model: onnx.ModelProto) -> str:
    """The Gather of the word-embedding table: excluding it keeps the hidden width,
    whose LayerNorms are not exact when channels go."""
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    return next(n.name for n in gathers if "word_embeddings" in n.input[0])


EXPORTS = [
    ("v3", "torchscript-14", True),
    ("v3", "torchscript-17", False),
    ("v3", "dynamo", False),
    ("v2", "torchscript-17", False),
]


@pytest.mark.parametrize(("version", "exporter", "constants"), EXPORTS)
def test_deberta_with_a_dynamic_batch_prunes_heads_folded_into_the_batch(
    version: str, exporter: str, constants: bool
):
    """DeBERTa-v3 exported with a dynamic batch computes its scores on [B*H, S, S]:
    the heads are folded into the batch axis through the score MatMuls, the position
    scores (a Tile of the position keys over the batch, GatherElements by an index
    expanded to B*H), the mask's way out to [B, H, S, S] and back, and probs @ V.
    The heads stayed whole (3.08x at 0.5 from dynamo). Now they are cut, H following
    the kept heads where the export writes it: the Reshapes out of the batch, the Div
    that gives the batch back for the Tile (TorchScript), the H * B of the index
    shape (dynamo, whose one index shape serves both layers, so their heads go
    together head by head). DeBERTa-v2's default attention (no relative positions)
    folds the same way."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    module = tiny_deberta_v3() if version == "v3" else tiny_deberta_v2()
    if exporter == "dynamo":
        model = export_dynamo(module, (ids,), ["input_ids"])
    else:
        model = export(module, (ids,), ["input_ids"], int(exporter.split("-")[1]))
    g.constants_to_initializers(model)

    whole = Prune(PruneConfig(sparsity=0.5)).run(model, None)
    layers = 18 if version == "v3" else 14
    assert any(n.startswith(f"structured: {layers}/{layers} layers pruned") for n in whole.notes), (
        whole.notes
    )
    heads = [n for n in whole.notes if n.startswith("removed 2/4 heads of")]
    assert len(heads) == (1 if exporter == "dynamo" else 2), whole.notes
    assert not any("folded into the batch" in n for n in whole.notes), whole.notes

    config = PruneConfig(sparsity=0.5, exclude_nodes=[word_embedding(model)])
    feeds = [{"input_ids": RNG.integers(0, 100, (batch, seq))} for batch, seq in SIZES]
    notes = prune_zeroed_exact_on(model, config, feeds, constants)
    assert sum(n.startswith("removed 2/4 heads of") for n in notes) == len(heads), notes


class BatchMixingAttention(torch.nn.Module):
    """Attention on [B*H, S, D] whose scores are then summed along that axis
    (cumsum), which mixes heads of different samples: no head can go."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 64)
        self.k = torch.nn.Linear(32, 64)
        self.v = torch.nn.Linear(32, 64)
        self.o = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, 4, 16).transpose(1, 2).reshape(-1, s, 16)

        scores = torch.bmm(fold(self.q(x)), fold(self.k(x)).transpose(1, 2))
        probs = torch.softmax(torch.cumsum(scores, 0), -1)
        y = torch.bmm(probs, fold(self.v(x))).view(-1, 4, s, 16).transpose(1, 2)
        return self.o(y.reshape(b, s, 64))


def test_heads_folded_into_the_batch_stay_whole_where_an_op_mixes_that_axis():
    """An op outside the folded rules (here CumSum along the folded axis) blocks the
    heads with a note naming it; the model still prunes its other groups and runs."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    model = export(BatchMixingAttention(), (x,), ["x"], 17)
    g.constants_to_initializers(model)
    out = Prune(PruneConfig(sparsity=0.5)).run(model, None)
    assert not any("heads of" in n for n in out.notes), out.notes
    assert any("reads heads folded into the batch axis" in n for n in out.notes), out.notes
    for batch in (2, 3):
        y = run(out.model, {"x": RNG.normal(size=(batch, 8, 32)).astype(np.float32)})
        assert y.shape == (batch, 8, 32)


@pytest.mark.parametrize(
    ("exporter", "need_weights", "masked"),
    [
        ("static", True, False),
        ("static", False, False),
        ("static", True, True),
        ("torchscript", True, False),
        ("torchscript", True, True),
        ("dynamo", True, False),
        ("dynamo", False, False),
        ("dynamo", True, True),
    ],
)
def test_multihead_attention_heads_split_into_the_batch_prune(
    exporter: str, need_weights: bool, masked: bool
):
    """nn.MultiheadAttention folds its heads into the batch axis right where it splits
    them, and merges them back from there. Both are followed: the packed projection's
    heads go (2 of 4), B*H follows them where a fixed batch writes it, and so does H*D
    of the way back. TorchScript with a dynamic batch unflattens the packed projection
    by E read from the input's shape: the step then simplifies first (onnxslim folds
    that fixed dim) and the same rules follow, B*H written as Mul(B, H). Exact at the
    export's batch (fixed-size) or at three. A key padding mask, expanded over the
    heads and folded to [B*H, 1, S], is copies of one slice per head: H of its Expand
    (and B*H of its fold, where written) follows the kept heads. Before, the heads
    stayed whole (4/5 layers)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    module = TorchAttention(need_weights, masked)
    args, names = (
        ((x, torch.zeros(2, 8, dtype=torch.bool)), ["x", "pad"]) if masked else ((x,), ["x"])
    )
    if exporter == "dynamo":
        model = export_dynamo(module, args, names)
    else:
        model = export(module, args, names, 17, static=exporter == "static")
    g.constants_to_initializers(model)
    folded: list[str] = []
    model = fold_shapes_if_it_helps(model, set(), folded)  # what the step does first
    assert any(n.startswith("simplified first") for n in folded) == (exporter == "torchscript")
    feeds = []
    for batch in (2,) if exporter == "static" else (1, 2, 3):
        feed = {"x": RNG.normal(size=(batch, 8, 32)).astype(np.float32)}
        if masked:
            feed["pad"] = np.arange(8) >= 5 + np.arange(batch)[:, None] % 3
        feeds.append(feed)
    notes = prune_zeroed_exact_on(model, PruneConfig(sparsity=0.5), feeds)
    assert any(n.startswith("structured: 5/5 layers pruned") for n in notes), notes
    assert sum(n.startswith("removed 2/4 heads of") for n in notes) == 1, notes


def test_sequence_first_multihead_attention_heads_prune():
    """torch's default layout, [S, B, E] (batch_first=False), goes through the same
    split into the batch and merge back, from a fixed-size export at batch 2."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, 32)
    model = export(TorchAttention(True, False, batch_first=False), (x,), ["x"], 17, static=True)
    g.constants_to_initializers(model)
    feeds = [{"x": RNG.normal(size=(8, 2, 32)).astype(np.float32)}]
    notes = prune_zeroed_exact_on(model, PruneConfig(sparsity=0.5), feeds)
    assert sum(n.startswith("removed 2/4 heads of") for n in notes) == 1, notes
