"""Structured pruning, part 1: find the channels that must be removed together.

Every channel-producing layer (Conv out-channels, Gemm/MatMul out-features)
gets one integer id per output channel. The ids flow forward through the graph
with the tensors that carry them: ops that keep channels independent pass them
on (activations, BatchNorm, pooling, Resize, Pad, Transpose, ...), Flatten
repeats each id over the spatial positions it folds in, Concat/Split/Slice map
offsets, and merges (a residual `Add`, squeeze-excite's `Mul`, a depthwise
Conv) *union* the ids meeting element by element. After the pass, two
union-find structures say what belongs together:

* `chan`: ids that must be removed together (one prunable *unit*: a channel of
  a residual stream in every layer that writes or reads it, or a whole
  attention head across Q, K and V);
* `grp`: units that come from the same layers (one *group*: the whole residual
  stream, one FFN, one set of heads). Sparsity is shared out per group.

Each place where a removed id must be sliced is a `Member` (an initializer and
an axis); attributes and shape constants that follow the channel count are
`Fixup`s. A tensor that reaches something we cannot rewrite exactly (a graph
output, a `Shape` that reads the channel count, an unknown op) *blocks* every
id it carries: their groups are left alone and the note names the node and
why. Channel positions are tracked as negative axes, since ONNX broadcasting
aligns shapes from the right.

Layout ops (Reshape, Concat, Split, ...) are handled in `prune_layout`; the
graph lookups and the records above live in `prune_graph`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from edgeslim.compressor import graph as g
from edgeslim.compressor.prune_folded import FOLDED_READERS, FoldedHeads
from edgeslim.compressor.prune_graph import (
    Block,
    Fixup,
    Member,
    Model,
    Renumber,
    Track,
    attr,
    label,
)
from edgeslim.compressor.prune_layout import LayoutOps

# One data input, element by element: the channel layout passes unchanged.
# Extra inputs (Clip's min/max, Dropout's ratio) must be scalars.
ELEMENTWISE_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish",
    "ThresholdedRelu", "Identity", "Cast", "Dropout", "IsNaN", "IsInf", "Not",
}  # fmt: skip
# Element-wise with broadcasting: tracked inputs are unioned channel by channel,
# constants that span the channels are sliced with them.
ELEMENTWISE_NARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
}  # fmt: skip
# Work on each channel of an [N, C, ...] tensor separately (RoiAlign and MaxRoiPool
# over every region of it, as Faster R-CNN's box head reads its FPN levels).
POOLS = {
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "RoiAlign", "MaxRoiPool",
}  # fmt: skip
# Per-channel parameters at these input positions, each of shape [C].
CHANNEL_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
# Over the channels these are exact when the removed channels were zero.
SUMS_OVER_CHANNELS = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare"}
REDUCES = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare", "ReduceLogSum",
}  # fmt: skip
SOFTMAXES = {"Softmax", "LogSoftmax", "Hardmax"}
WEIGHT_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


# ---------------------------------------------------------------------------
# Union-find over channel ids


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the lowest id stays the root

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class Source:
    """A layer that starts ids (or, for a depthwise Conv, carries them)."""

    node: onnx.NodeProto
    ids: np.ndarray


@dataclass
class Group:
    """Units that come from the same layers; sparsity is shared out per group."""

    root: int
    units: list[int]
    """chan roots, in channel order."""
    producers: list[onnx.NodeProto]
    blocked: str | None = None
    unit_width: int = 1
    """ids per unit in one producer (> 1 for attention heads)."""
    heads: str | None = None
    """What a unit is where it spans several channels: "heads", with grouped-query
    attention "K/V heads with their query heads", or "GroupNorm groups"."""
    normalized: str | None = None
    """A norm over these channels (a LayerNorm or RMSNorm over a transformer's hidden
    width, ConvNeXt V2's response norm over its FFN): removing channels changes its
    statistics, so the result is not exact."""
    maximum: str | None = None
    """A ReduceMax over these channels: it now takes the maximum of the kept ones."""
    hidden: bool = False
    """The channels are a hidden width that a LayerNorm or RMSNorm normalizes."""
    pinned: list[int] = field(default_factory=list)
    """Units that must stay while the others may go, and why (`pinned_by`)."""
    pinned_by: str | None = None

    @property
    def label(self) -> str:
        names = [label(n) for n in self.producers]
        if len(names) <= 3:
            return ", ".join(names)
        return f"{', '.join(names[:3])} (+{len(names) - 3} more)"

    @property
    def free_units(self) -> list[int]:
        """The units that may go: all but the pinned ones."""
        pinned = set(self.pinned)
        return [u for u in self.units if u not in pinned]

    @property
    def unit_name(self) -> str:
        if self.heads:
            return self.heads
        if self.hidden:
            return "hidden channels"
        convs = any(n.op_type in ("Conv", "ConvTranspose") for n in self.producers)
        return "channels" if convs else "neurons"


# ---------------------------------------------------------------------------
# Discovery


def tied_weights(m: Model) -> dict[str, list[onnx.NodeProto]]:
    """Weights shared by several layers of one kind (ALBERT's repeated layer, a
    detection head run on every FPN level) -> those layers. Their channels are
    one unit in all of them, so the weight is cut once and stays shared. A
    constant of one repeated value is no sign of sharing (`graph.one_value`)."""
    tied = {}
    for name, readers in m.consumers.items():
        w = m.float_weight(name)
        if w is None or w.ndim < 2 or len(readers) < 2 or m.uses(name) != len(readers):
            continue
        first = readers[0]
        if first.op_type not in WEIGHT_LAYERS or g.one_value(w):
            continue
        if all(
            r.op_type == first.op_type
            and list(r.attribute) == list(first.attribute)
            and list(r.input).index(name) == 1
            and list(r.input).count(name) == 1
            for r in readers
        ):
            tied[name] = readers
    return tied


class Discovery(LayoutOps, FoldedHeads):
    """One forward pass over the main graph (which ONNX keeps topologically sorted)."""

    def __init__(self, m: Model) -> None:
        self.m = m
        self.chan = UnionFind()
        self.grp = UnionFind()
        self.tracks: dict[str, Track] = {}
        self.members: dict[tuple[int, int, int], Member] = {}
        self.fixups: list[Fixup] = []
        self.renumbered: list[Renumber] = []
        self.head_splits: list[np.ndarray] = []
        """One id per head of each tensor split into heads."""
        self.blocked: list[tuple[np.ndarray, str]] = []
        self.pinned: list[tuple[np.ndarray, str]] = []
        """Ids that must stay, where the rest of their group may go."""
        self.normalized: list[tuple[np.ndarray, str, bool]] = []
        """ids a norm normalizes over, that norm, and whether it is a LayerNorm or
        RMSNorm of a hidden width."""
        self.channel_means: list[tuple[onnx.NodeProto, np.ndarray]] = []
        """ReduceMean nodes over the channels (no norm's) and the ids they average."""
        self.maxima: list[tuple[np.ndarray, str]] = []
        """ids a ReduceMax takes the maximum of, and that node."""
        self.sources: list[Source] = []
        self.layers: list[onnx.NodeProto] = []
        """Conv/ConvTranspose/Gemm/MatMul nodes with a constant float weight."""
        self.norm_groups: list[np.ndarray] = []
        """One id per group of each GroupNorm."""
        self.regrouped: dict[str, Track] = {}
        """A GroupNorm's output (its Reshape back) -> the track of its input."""
        self.tied = tied_weights(m)
        self.tied_ids: dict[str, np.ndarray] = {}
        """Output ids of each tied weight, the same for every layer that shares it."""
        self.tied_slices: dict[tuple[str, int], tuple[np.ndarray, set[int]]] = {}
        """(tied weight, axis) -> its ids there, and the layers that slice it."""
        self.folded_indices: dict[str, np.ndarray] = {}
        """GatherElements indices expanded to the size of folded heads -> their ids."""
        self.folded_gathered: set[str] = set()
        self.head_counts: dict[str, tuple[np.ndarray, set[str]]] = {}
        """A Mul writing B * H that follows kept heads -> their ids, and the Reshapes
        and Expands claimed for them."""

    # -- bookkeeping ----------------------------------------------------------

    def new_ids(self, node: onnx.NodeProto, n: int) -> np.ndarray:
        ids = self.chan.add(n)
        self.grp.add(n)
        for i in ids[1:]:
            self.grp.union(int(ids[0]), int(i))
        self.sources.append(Source(node, ids))
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self.chan.union(x, y)
            self.grp.union(x, y)

    def block(self, ids: np.ndarray, reason: str) -> None:
        self.blocked.append((ids, reason))

    def member(
        self, node: onnx.NodeProto, index: int, axis: int, ids: np.ndarray, role: str
    ) -> None:
        arr = self.m.array(node.input[index])
        if arr is None:
            raise Block(f"input {index} of {node.op_type} {label(node)} is not a constant")
        axis = axis % arr.ndim
        if arr.shape[axis] != len(ids):
            raise Block(
                f"{node.input[index]} of {label(node)} has {arr.shape[axis]} entries "
                f"where {len(ids)} channels arrive"
            )
        key = (id(node), index, axis)
        if key in self.members:  # the same slice reached twice: it must be cut the same way
            self.union(self.members[key].ids, ids)
        else:
            self.members[key] = Member(node, index, axis, ids, role)
        name = node.input[index]
        if name in self.tied:  # every layer sharing the weight cuts the same slice of it
            first, readers = self.tied_slices.setdefault((name, axis), (ids, set()))
            self.union(first, ids)
            readers.add(id(node))

    def set_track(self, name: str, track: Track) -> None:
        if not name:
            return
        self.tracks[name] = track
        if name in self.m.outputs:
            producer = self.m.producers.get(name)
            direct = producer is not None and any(s.node is producer for s in self.sources)
            self.block(
                track.ids,
                "its output is a graph output" if direct else f"it reaches graph output {name!r}",
            )
        if name in self.m.subgraph_refs:
            self.block(track.ids, f"its output is used inside an If/Loop/Scan body ({name})")

    # -- the pass ---------------------------------------------------------------

    def run(self) -> Discovery:
        for node in self.m.graph.node:
            ins = [self.tracks.get(name) if name else None for name in node.input]
            if node.input and ins[0] is None and self._norms_a_table(node):
                ins[0] = self._normed_table(node)
            if node.op_type in WEIGHT_LAYERS and self._weight(node) is not None:
                self.layers.append(node)
            outs: dict[str, Track] = {}
            if any(ins):
                try:
                    outs = self.visit(node, ins)
                except Block as why:
                    for t in ins:
                        if t is not None:
                            self.block(t.ids, str(why))
                    outs = {}
            outs.update(self.produce(node, ins))
            for name, track in outs.items():
                self.set_track(name, track)
        for (name, _), (ids, readers) in self.tied_slices.items():
            if len(readers) < len(self.tied[name]):
                self.block(
                    ids,
                    f"its weight is shared by {len(self.tied[name])} layers and only "
                    f"{len(readers)} of them read channels that can follow",
                )
        self._unchecked_folded_indices()
        self._unclaimed_head_counts()
        return self

    def _weight(self, node: onnx.NodeProto) -> np.ndarray | None:
        if len(node.input) < 2 or node.domain not in ("", "ai.onnx"):
            return None
        w = self.m.float_weight(node.input[1])
        if w is None or w.ndim < 2 or self.m.array(node.input[0]) is not None:
            return None
        return w

    def visit(self, node: onnx.NodeProto, ins: list[Track | None]) -> dict[str, Track]:
        """Tracked inputs reach `node`: the tracks of its outputs, or Block."""
        op = node.op_type
        where = f"{op} {label(node)}"
        if node.domain not in ("", "ai.onnx"):
            raise Block(f"it reaches custom op {node.domain}.{op} {label(node)}")
        if node.name in self.m.excluded:
            raise Block(f"consumer {label(node)} is excluded")
        if any(t is not None and t.folded for t in ins) and op not in FOLDED_READERS:
            raise Block(f"{where} reads heads folded into the batch axis")
        handler = HANDLERS.get(op)
        if handler is None:
            if op in ELEMENTWISE_UNARY:
                handler = Discovery._unary
            elif op in ELEMENTWISE_NARY:
                handler = Discovery._nary
            elif op in POOLS:
                handler = Discovery._pool
            elif op in CHANNEL_NORMS:
                handler = Discovery._norm
            elif op in REDUCES:
                handler = Discovery._reduce
            elif op in SOFTMAXES:
                handler = Discovery._softmax
            else:
                raise Block(f"it reaches {where}, which cannot follow the channels")
        return handler(self, node, ins, where)

    # -- layers that start ids -----------------------------------------------------

    def produce(self, node: onnx.NodeProto, ins: list[Track | None]) -> dict[str, Track]:
        """New ids for the output channels of a Conv/ConvTranspose/Gemm/MatMul layer."""
        op = node.op_type
        if op == "Gather":
            return self._embedding(node, ins)
        w = self._weight(node)
        if w is None or op not in WEIGHT_LAYERS:
            return {}
        group = int(attr(node, "group", 1))
        tiles = 1
        if op in ("Conv", "ConvTranspose"):
            if w.ndim < 3 or (group != 1 and (op != "Conv" or w.shape[1] == 1)):
                return {}  # depthwise Convs carry their input's ids (see _conv)
            out_axis, w_axis, rank = -(w.ndim - 1), 0 if op == "Conv" else 1, w.ndim
            if group > 1 and w.shape[0] % group:
                return {}
            # Grouped Conv: output k of every group is one unit, so groups stay equal.
            tiles = group
        elif op == "Gemm":
            if w.ndim != 2:
                return {}
            out_axis, w_axis, rank = -1, 0 if attr(node, "transB", 0) else 1, 2
        else:
            if ins[1] is not None:
                return {}
            out_axis, w_axis, rank = -1, w.ndim - 1, self.m.rank(node.output[0])
        weight = node.input[1]
        if weight in self.tied_ids:  # a layer sharing its weight: the same channels
            ids = self.tied_ids[weight]
            self.sources.append(Source(node, ids))
        else:
            ids = np.tile(self.new_ids(node, w.shape[w_axis] // tiles), tiles)
            if weight in self.tied:
                self.tied_ids[weight] = ids
        track = Track(out_axis, ids, rank)
        try:
            if node.name in self.m.excluded:
                raise Block("excluded")
            if weight in self.m.graph_inputs:
                raise Block("its weight is also a graph input (overridable at run time)")
            if self.m.uses(weight) > 1 and weight not in self.tied:
                raise Block("its weight is also read by other nodes than layers like it")
            self.member(node, 1, w_axis, ids, "out")
            if len(node.input) > 2 and node.input[2]:
                bias = self.m.array(node.input[2])
                if bias is None:
                    raise Block("its bias is computed, not a constant")
                if op != "Gemm":  # Conv's B is exactly [O]
                    self.member(node, 2, 0, ids, "param")
                else:  # Gemm's C broadcasts to [M, N]
                    self._broadcast(node, 2, bias, track)
        except Block as why:
            self.block(ids, str(why))
        return {node.output[0]: track}

    def _embedding(self, node: onnx.NodeProto, ins: list[Track | None]) -> dict[str, Track]:
        """Rows of a constant [V, H] table (word, position and token-type embeddings;
        constant indices too, as a static export writes position ids): its H columns
        start ids like a layer's outputs, so the residual stream they open becomes one
        group (the hidden width)."""
        table = self.m.float_weight(node.input[0])
        if (
            table is None
            or table.ndim != 2
            or ins[0] is not None
            or int(attr(node, "axis", 0)) != 0
            or node.domain not in ("", "ai.onnx")
        ):
            return {}
        rank = self.m.rank(node.input[1])
        ids = self.new_ids(node, table.shape[1])
        try:
            if node.name in self.m.excluded:
                raise Block("excluded")
            if node.input[0] in self.m.graph_inputs:
                raise Block("its table is also a graph input (overridable at run time)")
            if self.m.uses(node.input[0]) > 1:
                raise Block("its table is shared with other nodes (tied embeddings)")
            self.member(node, 0, 1, ids, "out")
        except Block as why:
            self.block(ids, str(why))
        return {node.output[0]: Track(-1, ids, None if rank is None else rank + 1)}

    def _norms_a_table(self, node: onnx.NodeProto) -> bool:
        """Whether `node` is a LayerNorm over the columns of a constant [N, H] table
        (DeBERTa's relative position embeddings, normed and then fed through the query
        and key projections that the tokens go through): a LayerNormalization, or the
        mean of one written out before opset 17."""
        table = self.m.float_weight(node.input[0])
        if table is None or table.ndim != 2:
            return False
        if node.op_type == "LayerNormalization":
            return int(attr(node, "axis", -1)) % 2 == 1
        if node.op_type != "ReduceMean" or not self._decomposed_layer_norm(node):
            return False
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1:
            found = self.m.array(node.input[1])
            axes = None if found is None else found.reshape(-1).tolist()
        return axes is not None and [a % 2 for a in axes] == [1]

    def _normed_table(self, node: onnx.NodeProto) -> Track:
        """The table's H columns start ids, which the shared projections then join to
        the hidden width; every node that reads the table cuts it alike."""
        name = node.input[0]
        table = self.m.array(name)
        ids = self.new_ids(node, table.shape[1])  # type: ignore[union-attr]
        track = Track(-1, ids, 2)
        self.tracks[name] = track  # the written-out LayerNorm's Sub reads it too
        try:
            if name in self.m.graph_inputs:
                raise Block("its table is also a graph input (overridable at run time)")
            for reader in self.m.consumers.get(name, []):
                if reader.op_type not in ("LayerNormalization", "ReduceMean", "Sub"):
                    raise Block(f"its table is also read by {reader.op_type} {label(reader)}")
                self.member(reader, list(reader.input).index(name), 1, ids, "out")
        except Block as why:
            self.block(ids, str(why))
        return track

    # -- pass-through ops --------------------------------------------------------

    def _unary(self, node, ins, where):
        if ins[0] is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        for name in node.input[1:]:
            dims = self.m.dims(name) if name else []
            if dims is None or math.prod(d or 2 for d in dims) != 1:
                raise Block(f"{where} has non-scalar extra inputs")
        # Dropout's mask has the data's shape too, so it carries the same ids.
        return {out: ins[0] for out in node.output if out}

    def _nary(self, node, ins, where):
        folded = self._folded_operands(node, ins, where)
        if folded is not None:
            ranks = [self.m.rank(name) for name in node.input if name]
            rank = None if None in ranks else max(r for r in ranks if r is not None)
            return {node.output[0]: replace(folded, rank=rank)}
        tracked = [t for t in ins if t is not None]
        wide = [t for t in tracked if t.size > 1]
        narrow = [t for t in tracked if wide and t.size == 1 and t.axis == wide[0].axis]
        if narrow:
            # One channel sliced off that scales all the others (FocalNet's gate for a
            # focal level): it broadcasts like a constant, and it must stay.
            for t in narrow:
                self.pinned.append((t.ids, f"{where} multiplies it into other channels"))
            tracked = [t for t in tracked if all(t is not n for n in narrow)]
            ins = [None if any(t is n for n in narrow) else t for t in ins]
        ref = tracked[0]
        for t in tracked[1:]:
            if t.axis != ref.axis or t.size != ref.size:
                raise Block(f"{where} merges tensors whose channels do not line up")
            self.union(ref.ids, t.ids)  # a residual/branch merge: same channel everywhere
        ranks = [t.rank for t in tracked]
        for i, (name, t) in enumerate(zip(node.input, ins, strict=True)):
            if t is not None or not name:
                continue
            arr = self.m.array(name)
            if arr is not None:
                self._broadcast(node, i, arr, ref)
                ranks.append(arr.ndim)
                continue
            expanded = self._expanded_constant(name, ref, node)
            if expanded is not None:
                self._broadcast(expanded, 0, self.m.array(expanded.input[0]), ref)
                ranks.append(self.m.rank(name))
                continue
            dims = self.m.dims(name, need=(ref.axis,))
            if dims is None:
                raise Block(f"shape of {name} unknown at {where}")
            ranks.append(len(dims))
            follows = any(
                t is not None and self._expanded_to_shape_of(name, data, ref.axis)
                for data, t in zip(node.input, ins, strict=True)
            ) or self._expanded_over_channels(name, ref, where)
            if len(dims) >= -ref.axis and dims[ref.axis] != 1 and not follows:
                raise Block(
                    f"it meets {name} at {where}, whose channels are not tracked "
                    "(merge with an unprunable branch)"
                )
        rank = None if None in ranks else max(r for r in ranks if r is not None)
        track = Track(ref.axis, ref.ids, rank)
        return {node.output[0]: track}

    def _expanded_over_channels(self, name: str, track: Track, where: str) -> bool:
        """Whether `name` (read by one node) is an Expand of something of size 1 on the
        channel axis to the channel count written as a constant: torch's dynamo
        exporter writes F.normalize's x / norm as x / Expand(norm, [B, N, C]). It is
        the same along the channels, so the count follows the kept channels."""
        node = self.m.producers.get(name)
        if node is None or node.op_type != "Expand" or self.m.uses(name) != 1:
            return False
        dims, shape = self.m.dims(node.input[0]), self.m.entries(node.input[1])
        axis = track.axis
        if dims is None or shape is None or len(shape) < -axis or shape[axis] != track.size:
            return False
        if len(dims) >= -axis and dims[axis] != 1:
            return False
        at = self._entry_at(node, 1, len(shape) + axis)
        if at is None:
            return False
        self._constant_fixup(at, lambda kept, ids=track.ids: kept(ids), where)
        return True

    def _expanded_constant(
        self, name: str, track: Track, reader: onnx.NodeProto
    ) -> onnx.NodeProto | None:
        """The Expand that makes `name` (read by `reader` alone) from a constant of its
        own, where its shape leaves the channel axis at 1: the channels are the
        constant's, so cutting them there cuts the expanded tensor (ViT's class token,
        expanded to the batch and concatenated to the patches)."""
        node = self.m.producers.get(name)
        readers = self.m.consumers.get(name, [])
        if node is None or node.op_type != "Expand" or self.m.uses(name) != len(readers):
            return None
        if any(r is not reader for r in readers):
            return None
        arr = self.m.array(node.input[0])
        shape = self.m.entries(node.input[1])
        if arr is None or self.m.uses(node.input[0]) != 1 or node.input[0] in self.m.graph_inputs:
            return None
        if shape is None or len(shape) < -track.axis or shape[track.axis] != 1:
            return None
        return node

    def _broadcast(self, node, index: int, arr: np.ndarray, track: Track) -> None:
        """Slice a constant that broadcasts against the tracked tensor, if it spans the channels."""
        if arr.ndim < -track.axis:
            return  # does not reach the channel axis: same value for every channel
        axis = arr.ndim + track.axis
        if arr.shape[axis] == 1:
            return
        if arr.shape[axis] != track.size:
            raise Block(f"constant {node.input[index]} of {label(node)} does not match")
        self.member(node, index, axis, track.ids, "param")

    def _require_channel_axis(self, track: Track, where: str) -> None:
        if track.pos(where) != 1:
            raise Block(f"{where} sees the channels on a non-channel axis")

    def _only_first_output(self, node) -> None:
        # MaxPool's Indices encode flat positions; BN's training outputs are stats.
        for out in node.output[1:]:
            if out and (self.m.consumers.get(out) or out in self.m.outputs):
                raise Block(f"extra output {out} of {label(node)} is used")

    def _pool(self, node, ins, where):
        if ins[0] is None or any(ins[1:]):  # only RoiAlign / MaxRoiPool have more inputs
            raise Block(f"it feeds the regions of {where}")
        self._require_channel_axis(ins[0], where)
        self._only_first_output(node)
        return {node.output[0]: ins[0]}

    def _norm(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        self._require_channel_axis(t, where)
        self._only_first_output(node)
        for i in CHANNEL_NORMS[node.op_type]:
            self.member(node, i, 0, t.ids, "param")
        return {node.output[0]: t}

    # -- GroupNorm, as torch exports it ---------------------------------------------

    def _group_norm_parts(
        self, split: onnx.NodeProto
    ) -> tuple[int, onnx.NodeProto, onnx.NodeProto] | None:
        """(G, the InstanceNormalization, the Reshape back) where `split` starts torch's
        GroupNorm export: Reshape x [N, C, ...] to [0, G, -1], InstanceNormalization
        with a scale and bias per group, Reshape back to Shape(x) (or to x's dims
        folded into a constant); the per-channel affine (Mul, Add) follows."""
        m = self.m
        target = m.array(split.input[1]) if len(split.input) > 1 else None
        if target is None or target.shape != (3,) or int(target[2]) != -1:
            return None
        groups, x = int(target[1]), split.input[0]
        norm = self._only_reader(split.output[0])
        if norm is None or norm.op_type != "InstanceNormalization":
            return None
        back = self._only_reader(norm.output[0])
        if back is None or back.op_type != "Reshape" or back.input[0] != norm.output[0]:
            return None
        dims = m.dims(x, need=(1,))
        if dims is None or len(dims) < 3 or dims[1] is None or groups < 1 or dims[1] % groups:
            return None
        # The batch stays: 0 copies it (torch's export), or it is the fixed batch (dynamo's).
        batch = int(target[0])
        if not (batch == 0 and not attr(split, "allowzero", 0)) and batch != dims[0]:
            return None
        shape = m.producers.get(back.input[1])
        if (
            shape is not None
            and shape.op_type == "Shape"
            and list(shape.input) == [x]
            # all of it: no start / end, or start=0 alone (torch's dynamo exporter)
            and attr(shape, "start", 0) == 0
            and attr(shape, "end") is None
            and m.uses(shape.output[0]) == 1
        ):
            return groups, norm, back
        folded = m.array(back.input[1])
        if folded is not None and folded.shape == (len(dims),) and int(folded[1]) == dims[1]:
            return groups, norm, back
        return None

    def _reshape(self, node, ins, where):
        t = ins[0]
        if t is not None and node.output[0] in self.regrouped:
            return {node.output[0]: self.regrouped[node.output[0]]}  # a GroupNorm's way back
        parts = None if t is None or ins[1] is not None else self._group_norm_parts(node)
        if parts is None:
            return super()._reshape(node, ins, where)
        groups, norm, back = parts
        if t.pos(where) != 1:
            raise Block(f"{where} groups the channels of a tensor whose channels are elsewhere")
        folded = self.m.array(back.input[1])
        if folded is not None:  # the way back's channel count is a constant too
            self.fixups.append(Fixup(back, 1, 1, lambda kept, ids=t.ids: kept(ids)))
        if groups == 1:
            # One group normalizes each sample over every channel and position (the
            # LayerNorm of a map in PoolFormer and MobileViTv2): as for a LayerNorm,
            # its statistics then cover the kept channels, which go on past the way
            # back; the tensors in between carry no track.
            self.normalized.append((t.ids, f"GroupNorm {label(norm)}", True))
            return {back.output[0]: t}
        # Its statistics are per group: removing part of one would change them, so a
        # whole group is one unit, the InstanceNormalization's scale and bias follow the
        # groups, and G in the target follows the kept count.
        rows = t.ids.reshape(groups, -1)
        self.union(np.repeat(rows[:, 0], rows.shape[1]), t.ids)
        self.norm_groups.append(rows[:, 0])
        self.fixups.append(Fixup(node, 1, 1, lambda kept, ids=rows[:, 0]: kept(ids)))
        self.regrouped[back.output[0]] = t
        return {node.output[0]: Track(-2, rows[:, 0], 3)}

    def _shape(self, node, ins, where):
        """A GroupNorm's Shape(x), read only by its Reshape back, follows the kept count."""
        back = self._only_reader(node.output[0])
        norm = None if back is None else self.m.producers.get(back.input[0])
        split = None if norm is None else self.m.producers.get(norm.input[0])
        if split is not None and split.op_type == "Reshape" and split.input[0] == node.input[0]:
            parts = self._group_norm_parts(split)
            if parts is not None and parts[2] is back:
                return {}
        return super()._shape(node, ins, where)

    def _layer_norm(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        axis = int(attr(node, "axis", -1))
        rank = t.rank
        if rank is None:
            raise Block(f"rank unknown at {where}")
        self._only_first_output(node)
        if t.pos(where) < axis % rank:
            return {node.output[0]: t}
        if axis % rank != rank - 1 or t.pos(where) != rank - 1:
            raise Block(f"{where} normalizes over the channels and other axes together")
        # Over the channels alone (a transformer's hidden width): scale and bias follow.
        for i in (1, 2):
            if len(node.input) > i and node.input[i]:
                self.member(node, i, -1, t.ids, "param")
        self.normalized.append((t.ids, where, True))
        return {node.output[0]: t}

    def _softmax(self, node, ins, where):
        t = ins[0]
        rank = t.rank
        if rank is None:
            raise Block(f"rank unknown at {where}")
        default = -1 if self.m.opset >= 13 else 1
        axis = int(attr(node, "axis", default)) % rank
        pos = t.pos(where)
        # Before opset 13 softmax flattens every axis from `axis` on into one.
        if pos == axis or (self.m.opset < 13 and pos > axis):
            raise Block(f"{where} normalizes over the channels")
        return {node.output[0]: t}

    def _reduce(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds the axes of {where}")
        pos = t.pos(where)
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed axes")
            axes = arr.tolist()
        if not axes:
            raise Block(f"{where} reduces every axis")
        axes = [a % t.rank for a in axes]  # type: ignore[operator]
        if pos in axes:
            return self._channel_statistic(node, t, where, alone=axes == [pos])
        if not attr(node, "keepdims", 1):
            rank = t.rank - len(axes)  # type: ignore[operator]
            pos -= sum(a < pos for a in axes)
            return {node.output[0]: Track(pos - rank, t.ids, rank)}
        return {node.output[0]: t}

    def _channel_statistic(self, node, t, where, alone: bool):
        """A reduction over the channels (`alone`, or with other axes) leaves no channel
        axis to track. Whether it survives channels going decides the rest."""
        layer_norm = alone and self._decomposed_layer_norm(node)
        centred = any(
            r.op_type in ("Add", "Sub") and node.input[0] in r.input
            for r in self.m.consumers.get(node.output[0], [])
        )
        if centred and not layer_norm:
            # x - mean(x) outside a LayerNorm: a removed channel would leave its -mean
            # out of the layers that read it, even where it was zero.
            raise Block(f"{where} reduces over the channels and is taken back off them")
        if node.op_type in SUMS_OVER_CHANNELS:
            return {}  # exact: a channel that is zero adds nothing to a sum or a norm
        hidden = layer_norm or (alone and self._rms_norm(node))
        if hidden or (alone and self._response_norm(node)):
            # The row statistics broadcast back over the channels.
            self.normalized.append((t.ids, where, hidden))
            return {}
        if node.op_type == "ReduceMean":
            # A channel mean that is no norm (CBAM's spatial attention): surgery scales it
            # by kept / all, so it stays the sum over the channels divided by their
            # original count, exact where the removed channels were zero.
            self.channel_means.append((node, t.ids))
            return {}
        if node.op_type == "ReduceMax":
            self.maxima.append((t.ids, where))  # CBAM's other statistic
            return {}
        raise Block(f"{where} reduces over the channels")

    def _only_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.m.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and self.m.uses(name) == 1 else None

    def _decomposed_layer_norm(self, node: onnx.NodeProto) -> bool:
        """Whether ReduceMean `node` is the mean or the variance of a LayerNorm written out
        (what exporters write before opset 17): d = x - mean(x); d / sqrt(mean(d^2) + eps).

        Anything else that averages over the channels changes meaning when channels go."""
        m = self.m
        mean = node
        pow_ = m.producers.get(node.input[0])
        if pow_ is not None and pow_.op_type == "Pow":  # the variance: find the mean
            sub = m.producers.get(pow_.input[0])
            found = sub is not None and sub.op_type == "Sub" and m.producers.get(sub.input[1])
            if not found or found.op_type != "ReduceMean":
                return False
            mean = found
        sub = self._only_reader(mean.output[0])
        if (
            sub is None
            or sub.op_type != "Sub"
            or list(sub.input) != [mean.input[0], mean.output[0]]
        ):
            return False
        readers = m.consumers.get(sub.output[0], [])
        pows = [r for r in readers if r.op_type == "Pow" and r.input[0] == sub.output[0]]
        divs = [r for r in readers if r.op_type == "Div" and r.input[0] == sub.output[0]]
        if len(pows) != 1 or len(divs) != 1 or m.uses(sub.output[0]) != 2:
            return False
        if not self._scalar_constant(pows[0].input[1], 2.0):
            return False
        var = self._only_reader(pows[0].output[0])
        if var is None or var.op_type != "ReduceMean" or not self._same_reduction(mean, var):
            return False
        sqrt = self._eps_sqrt(var)
        if sqrt is None:
            return False
        if self._only_reader(sqrt.output[0]) is not divs[0] or divs[0].input[1] != sqrt.output[0]:
            return False
        return node is mean or node is var

    def _rms_norm(self, node: onnx.NodeProto) -> bool:
        """Whether ReduceMean `node` is the mean square of an RMSNorm written out (T5,
        Llama): x * 1 / sqrt(mean(x^2) + eps), the reciprocal as Reciprocal or Div(1, .),
        or x / sqrt(...). Like a LayerNorm, it then normalizes over the kept channels."""
        m = self.m
        pow_ = m.producers.get(node.input[0])
        if pow_ is None or pow_.op_type != "Pow" or self._only_reader(pow_.output[0]) is not node:
            return False
        if not self._scalar_constant(pow_.input[1], 2.0) or attr(node, "keepdims", 1) != 1:
            return False
        x = pow_.input[0]
        sqrt = self._eps_sqrt(node)
        inverse = None if sqrt is None else self._only_reader(sqrt.output[0])
        if sqrt is None or inverse is None:
            return False
        if inverse.op_type == "Div" and list(inverse.input) == [x, sqrt.output[0]]:
            return True
        one = inverse.op_type == "Div" and self._scalar_constant(inverse.input[0], 1.0)
        if not one and inverse.op_type != "Reciprocal":
            return False
        scale = self._only_reader(inverse.output[0])
        return (
            scale is not None
            and scale.op_type == "Mul"
            and sorted(scale.input) == sorted([x, inverse.output[0]])
        )

    def _response_norm(self, node: onnx.NodeProto) -> bool:
        """Whether ReduceMean `node` is the channel mean of ConvNeXt V2's Global
        Response Norm: g / (mean(g) + eps), g each channel's L2 norm over the map.
        Like a LayerNorm, it then divides by the mean of the kept channels."""
        add = self._plus_eps(node) if attr(node, "keepdims", 1) == 1 else None
        if add is None:
            return False
        div = self._only_reader(add.output[0])
        return (
            div is not None
            and div.op_type == "Div"
            and list(div.input) == [node.input[0], add.output[0]]
        )

    def _plus_eps(self, stat: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Add of a scalar constant (a norm's epsilon) that alone reads `stat`."""
        add = self._only_reader(stat.output[0])
        if add is None or add.op_type != "Add":
            return None
        eps = [n for n in add.input if n != stat.output[0]]
        return add if len(eps) == 1 and self._scalar_constant(eps[0]) else None

    def _eps_sqrt(self, stat: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Sqrt of `stat` + a scalar constant (a norm's epsilon), each the only
        reader of the one before: the denominator of a LayerNorm or RMSNorm."""
        add = self._plus_eps(stat)
        if add is None:
            return None
        sqrt = self._only_reader(add.output[0])
        return sqrt if sqrt is not None and sqrt.op_type == "Sqrt" else None

    def _scalar_constant(self, name: str, value: float | None = None) -> bool:
        arr = self.m.array(name)
        if arr is None or arr.size != 1:
            return False
        return value is None or float(arr.reshape(-1)[0]) == value

    def _same_reduction(self, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
        def axes(n: onnx.NodeProto) -> list[int] | None:
            found = attr(n, "axes")
            if found is None and len(n.input) > 1 and n.input[1]:
                arr = self.m.array(n.input[1])
                found = None if arr is None else arr.reshape(-1).tolist()
            return None if found is None else [int(x) for x in found]

        return (
            axes(a) is not None
            and axes(a) == axes(b)
            and attr(a, "keepdims", 1) == attr(b, "keepdims", 1) == 1
        )

    # -- layers that read ids -----------------------------------------------------

    def _conv(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it is used as a weight of {where}")
        w = self.m.array(node.input[1])
        if w is None:
            raise Block(f"{where} has a computed weight")
        if t.axis != -(w.ndim - 1) or (t.rank is not None and t.rank != w.ndim):
            raise Block(f"{where} sees the channels on a non-channel axis")
        group = attr(node, "group", 1)
        if group == 1:
            # Conv weights are [O, I, k...]; ConvTranspose weights are [I, O, k...].
            self.member(node, 1, 1 if node.op_type == "Conv" else 0, t.ids, "in")
            return {}
        if node.op_type != "Conv" or t.size != group * w.shape[1] or w.shape[0] % group:
            raise Block(f"it feeds grouped {where}, whose groups cannot follow")
        if w.shape[1] > 1:
            # Grouped: input k of every group is one unit (the weight's in-slice k),
            # so every group keeps the same width; `group` stays.
            per_group = t.ids.reshape(group, -1)
            for row in per_group[1:]:
                self.union(per_group[0], row)
            self.member(node, 1, 1, per_group[0], "in")
            return {}
        # Depthwise: input channel c feeds outputs c*k .. c*k+k-1 (k = 1 usually).
        # Pruning c removes those filters and outputs, and `group` follows.
        if node.name in self.m.excluded:
            raise Block(f"consumer {label(node)} is excluded")
        out = np.repeat(t.ids, w.shape[0] // group)
        self.member(node, 1, 0, out, "out")
        if len(node.input) > 2 and node.input[2]:
            self.member(node, 2, 0, out, "param")
        self.fixups.append(Fixup(node, "group", None, lambda kept, ids=t.ids: kept(ids)))
        self.sources.append(Source(node, t.ids))
        return {node.output[0]: Track(t.axis, out, w.ndim)}

    def _gemm(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it is used as B or C of {where}")
        if self.m.array(node.input[1]) is None:
            raise Block(f"{where} has a computed weight")
        k_axis = -2 if attr(node, "transA", 0) else -1
        if t.axis != k_axis or (t.rank is not None and t.rank != 2):
            raise Block(f"{where} sees the channels on its batch axis")
        self.member(node, 1, 1 if attr(node, "transB", 0) else 0, t.ids, "in")
        return {}

    def _einsum(self, node, ins, where):
        """Einsum between activations (CvT's attention: 'bhlk,bhtk->bhlt'): the
        operands' channel axes must carry one letter, which the output keeps (heads
        on a batch-like axis) or which they contract together (Q.K over D). A
        constant operand along that letter would be a weight: not followed."""
        equation = attr(node, "equation")
        text = equation.decode() if isinstance(equation, bytes) else str(equation or "")
        text = text.replace(" ", "")
        if "->" not in text or "..." in text:
            raise Block(f"{where} has no explicit output or uses '...'")
        lhs, out = text.split("->")
        terms = lhs.split(",")
        if len(terms) != len(node.input):
            raise Block(f"{where} has an equation that does not match its inputs")
        tracked = [(terms[i], t) for i, t in enumerate(ins) if t is not None]
        letters = set()
        for term, t in tracked:
            if t.rank is None or t.rank != len(term):
                raise Block(f"rank unknown or not the equation's at {where}")
            letters.add(term[t.rank + t.axis])
        if len(letters) != 1:
            raise Block(f"{where} combines channels on different axes")
        letter = letters.pop()
        ref = tracked[0][1]
        for term, t in tracked:
            if term.count(letter) != 1 or t.size != ref.size:
                raise Block(f"{where} combines channels that do not line up")
            self.union(ref.ids, t.ids)
        for term, name, t in zip(terms, node.input, ins, strict=True):
            if t is not None or letter not in term:
                continue
            dims = self.m.dims(name)
            if dims is None or len(dims) != len(term) or dims[term.index(letter)] != 1:
                raise Block(f"it meets {name} at {where}, whose channels are not tracked")
        if letter not in out:
            if len(tracked) < 2:
                raise Block(f"{where} contracts the channels with an untracked operand")
            return {}
        return {node.output[0]: Track(out.index(letter) - len(out), ref.ids, len(out))}

    def _matmul(self, node, ins, where):
        a, b = ins[0], ins[1]
        w = self.m.array(node.input[1])
        if a is not None and w is not None:
            if a.axis != -1 or w.ndim < 2:
                raise Block(f"{where} sees the channels on a non-K axis")
            self.member(node, 1, w.ndim - 2, a.ids, "in")
            return {}
        if self.m.array(node.input[0]) is not None:
            raise Block(f"it is the right operand of {where} with a constant left operand")
        # Two activations (attention): batch axes broadcast, K is contracted.
        ra, rb = self.m.rank(node.input[0]), self.m.rank(node.input[1])
        if ra is None or rb is None or ra < 2 or rb < 2:
            raise Block(f"rank unknown at {where}")
        folded = self._folded_operands(node, ins, where)
        if folded is not None:
            if folded.axis > -3:
                raise Block(f"{where} multiplies over heads folded into the batch axis")
            return {node.output[0]: replace(folded, rank=max(ra, rb))}
        if a is not None and b is not None and a.axis == -1 and b.axis == -2:
            if a.size != b.size:
                raise Block(f"{where} contracts tensors whose channels do not line up")
            self.union(a.ids, b.ids)
            return {}
        rank = max(ra, rb)
        # One head (SegFormer's first stage): its channels stay on the last axis, so
        # probs @ V hands V's columns to the output's, and rows pass the same way.
        if a is None and b is not None and b.axis == -1:
            return {node.output[0]: Track(-1, b.ids, rank)}
        if b is None and a is not None and a.axis == -2:
            return {node.output[0]: Track(-2, a.ids, rank)}
        if a is not None and b is not None and a.axis <= -3 and b.axis >= -2:
            # Multi-query attention: the query heads on a batch axis meet the single
            # K/V head's own channels, which then stay whole; the heads go on if
            # that batch axis holds copies of the one head (checked below).
            self.block(b.ids, f"{where} reads one K/V head for every query head")
            b = None
        tracked = [t for t in (a, b) if t is not None]
        ref = tracked[0]
        if any(t.axis > -3 or t.axis != ref.axis or t.size != ref.size for t in tracked):
            raise Block(f"{where} multiplies over the channels")
        for t in tracked[1:]:
            self.union(ref.ids, t.ids)
        if len(tracked) == 1:  # the other operand must broadcast along the channels
            other = node.input[1] if a is not None else node.input[0]
            dims = self.m.dims(other, need=(ref.axis,))
            if dims is None or (len(dims) >= -ref.axis and dims[ref.axis] != 1):
                # ... or hold copies of one slice there (one K/V head repeated over
                # the query heads), whose count then follows the kept heads.
                copies = None
                if dims is not None and len(dims) >= -ref.axis and dims[ref.axis] == ref.size:
                    copies = self._repeats_of_one(other, ref.axis) or self._copies_run(
                        other, ref.axis
                    )
                if copies is None:
                    raise Block(f"{where} meets an operand whose channels are not tracked")
                self._copies_follow(copies, ref.ids, where)
        return {node.output[0]: Track(ref.axis, ref.ids, rank)}

    def _gather_elements(self, node, ins, where):
        """GatherElements along another axis than the channels: output row i reads data
        row i, so the channels pass on where the indices hold one slice per channel.
        Indices that are copies of one slice there (DeBERTa's relative positions,
        expanded over the folded heads) follow the kept count."""
        t, index = ins[0], node.input[1]
        if t is None or ins[1] is not None:
            raise Block(f"{where} gathers by the channels")
        rank = t.rank
        if rank is None or int(attr(node, "axis", 0)) % rank == t.pos(where):
            raise Block(f"{where} gathers along the channels")
        if t.folded:
            return self._folded_gather(node, t, where)
        dims = self.m.dims(index, need=(t.axis,))
        if dims is None or len(dims) != rank or dims[t.axis] != t.size:
            raise Block(f"{where} has indices that cannot follow the channels")
        copies = self._repeats_of_one(index, t.axis)
        if copies is None:
            raise Block(f"{where} has indices that differ from channel to channel")
        self._copies_follow(copies, t.ids, where)
        return {node.output[0]: t}


HANDLERS: dict[str, Callable[..., dict[str, Track]]] = {
    "Conv": Discovery._conv,
    "ConvTranspose": Discovery._conv,
    "Gemm": Discovery._gemm,
    "MatMul": Discovery._matmul,
    "Einsum": Discovery._einsum,
    "Transpose": Discovery._transpose,
    "Flatten": Discovery._flatten,
    "Reshape": Discovery._reshape,
    "Shape": Discovery._shape,
    "Gather": Discovery._gather,
    "GatherElements": Discovery._gather_elements,
    "Unsqueeze": Discovery._unsqueeze,
    "Squeeze": Discovery._squeeze,
    "Concat": Discovery._concat,
    "Split": Discovery._split,
    "Slice": Discovery._slice,
    "Pad": Discovery._pad,
    "Expand": Discovery._expand,
    "Tile": Discovery._tile,
    "Resize": Discovery._resize,
    "Upsample": Discovery._resize,
    "LayerNormalization": Discovery._layer_norm,
}


# ---------------------------------------------------------------------------
# Result


@dataclass
class Groups:
    """What discovery found: the groups, and the per-id lookups surgery needs."""

    d: Discovery
    groups: list[Group]
    roots: np.ndarray
    """chan root of every id."""
    group_of: np.ndarray
    """grp root of every id."""

    @property
    def prunable(self) -> list[Group]:
        return [grp for grp in self.groups if grp.blocked is None and len(grp.units) > 1]

    def reached_sides(self) -> set[tuple[int, str]]:
        """(id of a weight layer, "in" or "out") for each side a prunable group slices."""
        ok = {grp.root for grp in self.prunable}
        return {
            (id(mem.node), mem.role)
            for mem in self.d.members.values()
            if mem.index == 1 and mem.role in ("in", "out")
            if any(int(r) in ok for r in np.unique(self.group_of[mem.ids]))
        }

    def reached_layers(self) -> list[onnx.NodeProto]:
        """Weight layers with an input or output slice in a prunable group."""
        hit = {node for node, _ in self.reached_sides()}
        return [n for n in self.d.layers if id(n) in hit]


def discover(model: onnx.ModelProto, excluded: set[str]) -> Groups:
    """Find the dependency groups of `model` (its Split nodes may gain explicit sizes)."""
    m = Model.of(model, excluded)
    d = Discovery(m).run()
    roots = d.chan.roots()
    group_of = np.array([d.grp.find(i) for i in range(len(roots))], dtype=np.int64)

    def first_per_group(found: list[tuple[np.ndarray, str]]) -> dict[int, str]:
        """group -> the first text recorded for any of its ids."""
        out: dict[int, str] = {}
        for ids, text in found:
            for gid in np.unique(group_of[ids]).tolist():
                out.setdefault(int(gid), text)
        return out

    blocked = first_per_group(d.blocked)
    normalized: dict[int, str] = {}
    hidden: set[int] = set()
    for ids, where, width in d.normalized:
        for gid in np.unique(group_of[ids]).tolist():
            normalized.setdefault(int(gid), where)
            if width:
                hidden.add(int(gid))
    maximum = first_per_group(d.maxima)
    by_group: dict[int, Group] = {}
    for src in d.sources:
        gid = int(group_of[src.ids[0]]) if len(src.ids) else -1
        if gid < 0:
            continue
        grp = by_group.setdefault(gid, Group(gid, [], [], blocked.get(gid)))
        if all(p is not src.node for p in grp.producers):
            grp.producers.append(src.node)
    units: dict[int, set[int]] = {}
    for gid, unit in zip(group_of.tolist(), roots.tolist(), strict=True):
        units.setdefault(gid, set()).add(unit)
    for grp in by_group.values():
        grp.units = sorted(units[grp.root])
        grp.normalized = normalized.get(grp.root)
        grp.maximum = maximum.get(grp.root)
        grp.hidden = grp.root in hidden
        # ids per unit in one producer: > 1 only where a unit spans channels (heads)
        first = next(s for s in d.sources if int(group_of[s.ids[0]]) == grp.root)
        grp.unit_width = max(1, len(first.ids) // len(np.unique(roots[first.ids])))
    for ids, reason in d.pinned:
        grp = by_group.get(int(group_of[ids[0]]))
        if grp is not None:
            grp.pinned = sorted({*grp.pinned, *roots[ids].tolist()})
            grp.pinned_by = grp.pinned_by or reason
    for reps in d.norm_groups:
        grp = by_group.get(int(group_of[reps[0]]))
        if grp is not None and len(np.unique(roots[reps])) > 1:
            grp.heads = grp.heads or "GroupNorm groups"
    for heads in d.head_splits:
        grp = by_group.get(int(group_of[heads[0]]))
        if grp is not None:
            # Several heads of one tensor in a unit: query heads that read one K/V head.
            shared = len(np.unique(roots[heads])) < len(heads)
            grp.heads = "K/V heads with their query heads" if shared else grp.heads or "heads"
    return Groups(d, list(by_group.values()), roots, group_of)
