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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.compressor import graph as g

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}

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
# Work on each channel of an [N, C, ...] tensor separately.
POOLS = {
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
}  # fmt: skip
# Per-channel parameters at these input positions, each of shape [C].
CHANNEL_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
REDUCES = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare", "ReduceLogSum",
}  # fmt: skip
SOFTMAXES = {"Softmax", "LogSoftmax", "Hardmax"}
WEIGHT_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class Block(Exception):
    """The tensor reaches something that cannot follow its channels."""


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type} -> {node.output[0]}"


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------------------
# Lookups over the graph


@dataclass
class Model:
    """Lookup tables over the main graph, built once per pruning pass."""

    model: onnx.ModelProto
    graph: onnx.GraphProto
    inits: dict[str, onnx.TensorProto]
    consumers: dict[str, list[onnx.NodeProto]]
    producers: dict[str, onnx.NodeProto]
    shapes: dict[str, list[int | None]]
    outputs: set[str]
    graph_inputs: set[str]
    subgraph_refs: set[str]
    """Names read by nodes inside If/Loop/Scan bodies (outer-scope references)."""
    excluded: set[str]
    opset: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    probed: dict[str, list[int]] | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto, excluded: set[str]) -> Model:
        graph = model.graph
        refs = {
            name
            for sub in g.iter_graphs(graph)
            if sub is not graph
            for node in sub.node
            for name in node.input
        }
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        return cls(
            model=model,
            graph=graph,
            inits=g.initializer_map(graph),
            consumers=g.consumers(graph),
            producers=g.producers(graph),
            shapes=infer_shapes(model),
            outputs={o.name for o in graph.output},
            graph_inputs={i.name for i in graph.input},
            subgraph_refs=refs,
            excluded=excluded,
            opset=opset,
        )

    def array(self, name: str) -> np.ndarray | None:
        """The initializer's value, or None for an activation."""
        if name not in self.inits:
            return None
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.inits[name])
        return self.arrays[name]

    def float_weight(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return self.array(name) if init is not None and init.data_type in FLOAT_TYPES else None

    def uses(self, name: str) -> int:
        """Readers of a tensor: node inputs, graph inputs/outputs, If/Loop/Scan bodies."""
        extra = (name in self.outputs) + (name in self.graph_inputs) + (name in self.subgraph_refs)
        return len(self.consumers.get(name, [])) + extra

    def dims(self, name: str) -> list[int | None] | None:
        """Dims of a tensor: constants exactly, activations from shape inference, with
        a single probe run through onnxruntime filling in what inference left unknown."""
        arr = self.array(name)
        if arr is not None:
            return list(arr.shape)
        known = self.shapes.get(name)
        if known is not None and None not in known:
            return known
        if self.probed is None:
            self.probed = probe_shapes(self.model)
        probed = self.probed.get(name)
        if probed is not None and (known is None or len(known) == len(probed)):
            # Only the dims inference could not tell come from the probe.
            return [k if k is not None else p for k, p in zip(known or probed, probed, strict=True)]
        return known

    def rank(self, name: str) -> int | None:
        dims = self.dims(name)
        return None if dims is None else len(dims)


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where symbolic); empty when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # models > 2 GB, unknown domains: fail safe
        return {}
    shapes: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = vi.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    return shapes


def probe_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Run the model once on made-up inputs and record every intermediate shape.

    Shape inference loses track behind computed Reshape targets (attention
    masks, head splits); a real run does not. Symbolic dims become 2 for the
    leading (batch) axis and 16 elsewhere. Any failure just means no probe.
    """
    try:
        import onnxruntime as ort

        work = onnx.ModelProto()
        work.CopyFrom(model)
        del work.graph.value_info[:]
        present = {o.name for o in work.graph.output}
        for node in work.graph.node:
            for out in node.output:
                if out and out not in present:
                    work.graph.output.append(onnx.ValueInfoProto(name=out))
                    present.add(out)
        inits = {t.name for t in work.graph.initializer}
        rng = np.random.default_rng(0)
        feeds = {}
        for vi in work.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = [
                d.dim_value if d.HasField("dim_value") else (2 if i == 0 else 16)
                for i, d in enumerate(tt.shape.dim)
            ]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feeds[vi.name] = rng.normal(size=dims).astype(dtype)
            else:
                feeds[vi.name] = np.ones(dims, dtype=dtype)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            work.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        return {
            name: list(np.shape(value))
            for name, value in zip(names, session.run(names, feeds), strict=True)
        }
    except Exception:
        return {}


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


@dataclass(frozen=True)
class Track:
    """The channel axis of one tensor and the id of each index along it."""

    axis: int
    """Negative axis of the channel dimension."""
    ids: np.ndarray
    rank: int | None

    def pos(self, where: str) -> int:
        if self.rank is None:
            raise Block(f"rank unknown at {where}")
        return self.rank + self.axis

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass
class Member:
    """Slice the initializer at `node.input[index]` along `axis` with the kept ids."""

    node: onnx.NodeProto
    index: int
    axis: int
    ids: np.ndarray
    role: str
    """out: a layer's output slice (scores), in: a layer's input slice, param: the rest."""


@dataclass
class Fixup:
    """An attribute or integer constant that follows the number of kept channels.

    `where` is an attribute name or the input index of a constant; `pos` the
    element in that list (None for a scalar attribute).
    """

    node: onnx.NodeProto
    where: str | int
    pos: int | None
    value: Callable[[Callable[[np.ndarray], int]], int]
    """Given kept(ids) -> number of ids kept, the new value."""


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

    @property
    def label(self) -> str:
        names = [label(n) for n in self.producers]
        if len(names) <= 3:
            return ", ".join(names)
        return f"{', '.join(names[:3])} (+{len(names) - 3} more)"

    @property
    def unit_name(self) -> str:
        if self.unit_width > 1:
            return "heads"
        convs = any(n.op_type in ("Conv", "ConvTranspose") for n in self.producers)
        return "channels" if convs else "neurons"


# ---------------------------------------------------------------------------
# Discovery


class Discovery:
    """One forward pass over the main graph (which ONNX keeps topologically sorted)."""

    def __init__(self, m: Model) -> None:
        self.m = m
        self.chan = UnionFind()
        self.grp = UnionFind()
        self.tracks: dict[str, Track] = {}
        self.members: dict[tuple[int, int, int], Member] = {}
        self.fixups: list[Fixup] = []
        self.blocked: list[tuple[np.ndarray, str]] = []
        self.sources: list[Source] = []
        self.layers: list[onnx.NodeProto] = []
        """Conv/ConvTranspose/Gemm/MatMul nodes with a constant float weight."""

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
        w = self._weight(node)
        if w is None or op not in WEIGHT_LAYERS:
            return {}
        group = attr(node, "group", 1)
        if op in ("Conv", "ConvTranspose"):
            if w.ndim < 3 or group != 1:
                return {}  # depthwise Convs carry their input's ids (see _conv)
            out_axis, w_axis, rank = -(w.ndim - 1), 0 if op == "Conv" else 1, w.ndim
        elif op == "Gemm":
            if w.ndim != 2:
                return {}
            out_axis, w_axis, rank = -1, 0 if attr(node, "transB", 0) else 1, 2
        else:
            if ins[1] is not None:
                return {}
            out_axis, w_axis, rank = -1, w.ndim - 1, self.m.rank(node.output[0])
        ids = self.new_ids(node, w.shape[w_axis])
        track = Track(out_axis, ids, rank)
        weight = node.input[1]
        try:
            if node.name in self.m.excluded:
                raise Block("excluded")
            if weight in self.m.graph_inputs:
                raise Block("its weight is also a graph input (overridable at run time)")
            if self.m.uses(weight) > 1:
                raise Block("its weight is shared with other nodes")
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
        tracked = [t for t in ins if t is not None]
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
            dims = self.m.dims(name)
            if dims is None:
                raise Block(f"shape of {name} unknown at {where}")
            ranks.append(len(dims))
            if len(dims) >= -ref.axis and dims[ref.axis] != 1:
                raise Block(
                    f"it meets {name} at {where}, whose channels are not tracked "
                    "(merge with an unprunable branch)"
                )
        rank = None if None in ranks else max(r for r in ranks if r is not None)
        track = Track(ref.axis, ref.ids, rank)
        return {node.output[0]: track}

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

    def _layer_norm(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        axis = int(attr(node, "axis", -1))
        rank = t.rank
        if rank is None:
            raise Block(f"rank unknown at {where}")
        if t.pos(where) >= axis % rank:
            raise Block(f"{where} normalizes over the channels")
        self._only_first_output(node)
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
            raise Block(f"{where} reduces over the channels")
        if not attr(node, "keepdims", 1):
            rank = t.rank - len(axes)  # type: ignore[operator]
            pos -= sum(a < pos for a in axes)
            return {node.output[0]: Track(pos - rank, t.ids, rank)}
        return {node.output[0]: t}

    # -- layout ops -----------------------------------------------------------------

    def _transpose(self, node, ins, where):
        t = ins[0]
        perm = attr(node, "perm")
        rank = t.rank if perm is None else len(perm)
        if rank is None:
            raise Block(f"rank unknown at {where}")
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        new = perm.index(t.pos(where))
        return {node.output[0]: Track(new - rank, t.ids, rank)}

    def _flatten(self, node, ins, where, axis: int | None = None):
        """[d0..dk-1, dk..] -> [outer, inner]: each channel id repeats over the positions
        folded in with it."""
        t = ins[0]
        dims = self.m.dims(node.input[0])
        if not dims:
            raise Block(f"shape of {node.input[0]} unknown at {where}")
        rank = len(dims)
        channel = rank + t.axis
        axis = int(attr(node, "axis", 1)) if axis is None else axis
        axis = axis + rank if axis < 0 else axis
        if channel < axis:
            raise Block(f"{where} folds the channels into the leading axis")
        before, after = dims[axis:channel], dims[channel + 1 :]
        if any(d is None for d in [*before, *after]):
            raise Block(f"spatial size unknown at {where}")
        outer, inner = math.prod(before), math.prod(after)  # type: ignore[arg-type]
        # Column of (o, c, i) in the flattened row is (o * C + c) * inner + i.
        ids = np.tile(np.repeat(t.ids, inner), outer)
        return {node.output[0]: Track(-1, ids, 2)}

    def _reshape(self, node, ins, where):
        t = ins[0]
        if t is None or ins[1] is not None:
            raise Block(f"it feeds the shape input of {where}")
        if attr(node, "allowzero", 0):
            raise Block(f"{where} uses allowzero")
        if self._is_flatten_shape(node):
            return self._flatten(node, ins, where, 1)
        target = self._shape_pieces(node.input[1])
        if target is None or t.rank is None:
            raise Block(f"{where} has a target shape that cannot be followed")
        values = [v for v, _ in target]
        others_ok = all(v != -1 for v in values[:-2])
        if t.axis == -1 and len(values) == t.rank + 1 and others_ok:
            return self._split_heads(node, t, target, where)
        if t.axis == -2 and len(values) == t.rank - 1 and others_ok:
            return self._merge_heads(node, t, target, where)
        if len(values) == t.rank and self._same_dims(node.input[0], node.output[0]):
            # A reshape that keeps every dim where it was (e.g. [B, -1, S, D] on
            # [B, H, S, D]): the channels stay put if their entry follows them.
            value, at = target[t.pos(where)]
            if value == -1:
                return {node.output[0]: t}
            if value == t.size and at is not None:
                self._constant_fixup(at, lambda kept, ids=t.ids: kept(ids), where)
                return {node.output[0]: t}
        raise Block(f"{where} changes the channel layout in a way that cannot be followed")

    def _split_heads(self, node, t: Track, target, where):
        """[..., H*D] -> [..., H, D]: the D ids of each head become one unit."""
        (h, h_at), (d, _) = target[-2], target[-1]
        if d is None or d <= 0 or t.size % d or h not in (-1, t.size // d):
            raise Block(f"{where} splits the channels in a way that cannot be followed")
        heads = t.ids.reshape(-1, d)
        for row in heads:
            self.union(row[:1].repeat(d - 1), row[1:])
        if h != -1:
            self._constant_fixup(h_at, lambda kept, ids=heads[:, 0]: kept(ids), where)
        return {node.output[0]: Track(-2, heads[:, 0], t.rank + 1)}

    def _merge_heads(self, node, t: Track, target, where):
        """[..., H, D] -> [..., H*D]: each head id repeats over its D channels."""
        dims = self.m.dims(node.input[0])
        d = dims[-1] if dims else None
        v, v_at = target[-1]
        if d is None or v not in (-1, t.size * d):
            raise Block(f"{where} merges the channels in a way that cannot be followed")
        if v != -1:
            self._constant_fixup(v_at, lambda kept, ids=t.ids, d=d: kept(ids) * d, where)
        return {node.output[0]: Track(-1, np.repeat(t.ids, d), t.rank - 1)}

    def _same_dims(self, a: str, b: str) -> bool:
        da, db = self.m.dims(a), self.m.dims(b)
        return da is not None and None not in da and da == db

    def _constant_fixup(self, at, value, where) -> None:
        if at is None:
            raise Block(f"{where} has a computed head count")
        node, index, pos = at
        self.fixups.append(Fixup(node, index, pos, value))

    def _shape_pieces(self, name: str):
        """A Reshape target as [(value or None if computed, (node, input, pos) or None)]."""
        arr = self.m.array(name)
        consumers = self.m.consumers.get(name, [])
        if arr is not None:
            return [(int(v), (consumers[0], 1, i)) for i, v in enumerate(arr.reshape(-1))]
        concat = self.m.producers.get(name)
        if concat is None or concat.op_type != "Concat" or attr(concat, "axis", 0) != 0:
            return None
        pieces = []
        for index, part in enumerate(concat.input):
            value = self.m.array(part)
            if value is None:
                dims = self.m.dims(part)
                if dims is None or len(dims) != 1 or dims[0] is None:
                    return None
                pieces += [(None, None)] * int(dims[0])
            else:
                pieces += [(int(v), (concat, index, i)) for i, v in enumerate(value.reshape(-1))]
        return pieces

    def _is_flatten_shape(self, node) -> bool:
        data, shape_name = node.input[0], node.input[1]
        target = self.m.array(shape_name)
        if target is not None:
            values = target.reshape(-1).tolist()
            if len(values) != 2 or values[1] != -1:
                return False
            dims = self.m.dims(data)
            return values[0] == 0 or bool(dims and dims[0] == values[0])
        return self._is_batch_concat(shape_name, data)

    def _is_batch_concat(self, shape_name: str, data: str) -> bool:
        """Concat(Unsqueeze(Gather(Shape(data), 0)), [-1]): what `x.view(x.size(0), -1)` exports."""
        concat = self.m.producers.get(shape_name)
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            return False
        tail = self.m.array(concat.input[1])
        if tail is None or tail.reshape(-1).tolist() != [-1]:
            return False
        unsq = self.m.producers.get(concat.input[0])
        gather = unsq and unsq.op_type == "Unsqueeze" and self.m.producers.get(unsq.input[0])
        if not gather or gather.op_type != "Gather" or self._gathered(gather) != [0]:
            return False
        shape = self.m.producers.get(gather.input[0])
        return bool(shape and shape.op_type == "Shape" and shape.input[0] == data)

    def _gathered(self, gather) -> list[int] | None:
        idx = self.m.array(gather.input[1])
        if attr(gather, "axis", 0) != 0 or idx is None:
            return None
        return [int(i) for i in idx.reshape(-1)]

    def _shape(self, node, ins, where):
        """Reading the sizes of other axes is fine; reading the channel count is not."""
        t = ins[0]
        rank = t.rank
        readers = self.m.consumers.get(node.output[0], [])
        if rank is not None and node.output[0] not in self.m.outputs and readers:
            start, end, _ = slice(attr(node, "start"), attr(node, "end")).indices(rank)
            pos = t.pos(where)
            if not start <= pos < end:
                return {}
            n = end - start
            read = [self._gathered(r) if r.op_type == "Gather" else None for r in readers]
            if all(r is not None and (pos - start) not in [i % n for i in r] for r in read):
                return {}
        raise Block(f"its channel count is read by {where}")

    def _gather(self, node, ins, where):
        t = ins[0]
        if t is None or ins[1] is not None:
            raise Block(f"it is used as indices of {where}")
        pos = t.pos(where)
        axis = int(attr(node, "axis", 0)) % t.rank  # type: ignore[operator]
        if axis == pos:
            raise Block(f"{where} picks channels")
        k = self.m.rank(node.input[1])
        if k is None:
            raise Block(f"rank of the indices unknown at {where}")
        rank = t.rank - 1 + k  # type: ignore[operator]
        new_pos = pos if axis > pos else pos - 1 + k
        return {node.output[0]: Track(new_pos - rank, t.ids, rank)}

    def _axes(self, node, where) -> list[int]:
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed axes")
            axes = arr.reshape(-1).tolist()
        if not axes:
            raise Block(f"{where} has no explicit axes")
        return [int(a) for a in axes]

    def _unsqueeze(self, node, ins, where):
        t = ins[0]
        if ins[1:] and any(ins[1:]):
            raise Block(f"it feeds the axes of {where}")
        pos = t.pos(where)
        rank = t.rank + len(self._axes(node, where))  # type: ignore[operator]
        axes = sorted(a % rank for a in self._axes(node, where))
        kept = [i for i in range(rank) if i not in axes]
        return {node.output[0]: Track(kept[pos] - rank, t.ids, rank)}

    def _squeeze(self, node, ins, where):
        t = ins[0]
        if ins[1:] and any(ins[1:]):
            raise Block(f"it feeds the axes of {where}")
        pos = t.pos(where)
        axes = [a % t.rank for a in self._axes(node, where)]  # type: ignore[operator]
        if pos in axes:
            raise Block(f"{where} squeezes the channel axis")
        rank = t.rank - len(axes)  # type: ignore[operator]
        return {node.output[0]: Track(pos - sum(a < pos for a in axes) - rank, t.ids, rank)}

    def _concat(self, node, ins, where):
        tracked = [t for t in ins if t is not None]
        ref = tracked[0]
        pos = ref.pos(where)
        axis = int(attr(node, "axis", 0)) % ref.rank  # type: ignore[operator]
        if axis != pos:  # concatenated along another axis: the channels must line up
            if len(tracked) != len(ins):
                raise Block(f"{where} joins it with a tensor whose channels are not tracked")
            return self._nary(node, ins, where)
        parts = []
        for name, t in zip(node.input, ins, strict=True):
            if t is not None:
                if t.axis != ref.axis:
                    raise Block(f"{where} joins tensors of different ranks")
                parts.append(t.ids)
                continue
            dims = self.m.dims(name)
            if dims is None or len(dims) != ref.rank or dims[axis] is None:
                raise Block(f"shape of {name} unknown at {where}")
            fixed = self.chan.add(dims[axis])  # channels nobody may remove
            self.grp.add(dims[axis])
            self.block(fixed, f"untracked input of {where}")
            parts.append(fixed)
        return {node.output[0]: Track(ref.axis, np.concatenate(parts), ref.rank)}

    def _split(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds the sizes of {where}")
        pos = t.pos(where)
        axis = int(attr(node, "axis", 0)) % t.rank  # type: ignore[operator]
        outs = [o for o in node.output]
        if axis != pos:
            return {o: t for o in outs if o}
        sizes = attr(node, "split")
        at: str | int = "split"
        if sizes is None and len(node.input) > 1 and node.input[1]:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed sizes")
            sizes, at = arr.reshape(-1).tolist(), 1
        if sizes is None:
            if t.size % len(outs):
                raise Block(f"{where} splits unevenly")
            sizes = [t.size // len(outs)] * len(outs)
            at = "split" if self.m.opset < 13 else 1
            self._explicit_split(node, sizes, at)
        bounds = np.cumsum([0, *sizes])
        result = {}
        for k, out in enumerate(outs):
            ids = t.ids[bounds[k] : bounds[k + 1]]
            self.fixups.append(Fixup(node, at, k, lambda kept, ids=ids: kept(ids)))
            if out:
                result[out] = Track(t.axis, ids, t.rank)
        return result

    def _explicit_split(self, node, sizes: list[int], at: str | int) -> None:
        """Write out the equal split, so it can follow uneven pruning."""
        for a in list(node.attribute):
            if a.name == "num_outputs":
                node.attribute.remove(a)
        if at == "split":
            node.attribute.append(onnx.helper.make_attribute("split", sizes))
            return
        name = f"{node.output[0]}__split"
        self.m.graph.initializer.append(
            numpy_helper.from_array(np.array(sizes, dtype=np.int64), name)
        )
        self.m.inits[name] = self.m.graph.initializer[-1]
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name
        self.m.consumers[name] = [node]

    def _slice(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds the bounds of {where}")
        if self.m.opset < 10:
            raise Block(f"{where} (attribute form) cannot follow the channels")
        pos = t.pos(where)
        consts = [self.m.array(n) if n else None for n in [*node.input[1:], "", "", ""][:4]]
        starts, ends, axes, steps = consts
        if (
            starts is None
            or ends is None
            or (len(node.input) > 3 and node.input[3] and axes is None)
        ):
            raise Block(f"{where} has computed bounds")
        if len(node.input) > 4 and node.input[4] and steps is None:
            raise Block(f"{where} has computed steps")
        axes_l = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        axes_l = [a % t.rank for a in axes_l]  # type: ignore[operator]
        if pos not in axes_l:
            return {node.output[0]: t}
        k = axes_l.index(pos)
        if steps is not None and int(steps[k]) != 1:
            raise Block(f"{where} steps over the channels")
        start, end, _ = slice(int(starts[k]), int(ends[k])).indices(t.size)
        ids = t.ids[start:end]
        head = t.ids[:start]
        self.fixups.append(Fixup(node, 1, k, lambda kept, head=head: kept(head)))
        self.fixups.append(
            Fixup(node, 2, k, lambda kept, head=head, ids=ids: kept(head) + kept(ids))
        )
        return {node.output[0]: Track(t.axis, ids, t.rank)}

    def _pad(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        pads = attr(node, "pads")
        if pads is None and len(node.input) > 1:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed pads")
            pads = arr.reshape(-1).tolist()
        axes = [a % t.rank for a in self._axes_or_all(node, t)]  # type: ignore[operator]
        pos = t.pos(where)
        if pos in axes:
            k = axes.index(pos)
            if pads[k] or pads[k + len(axes)]:
                raise Block(f"{where} pads the channels")
        return {node.output[0]: t}

    def _axes_or_all(self, node, t: Track) -> list[int]:
        if node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            arr = self.m.array(node.input[3])
            if arr is None:
                raise Block(f"Pad {label(node)} has computed axes")
            return arr.reshape(-1).tolist()
        return list(range(t.rank))  # type: ignore[arg-type]

    def _resize(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        pos = t.pos(where)
        if node.op_type == "Upsample" and self.m.opset < 9:
            scales = attr(node, "scales")
            if scales is None or scales[pos] != 1:
                raise Block(f"{where} scales the channels")
            return {node.output[0]: t}
        # Resize: X, roi, scales, sizes (opset 11+); X, scales (opset 10, Upsample 9).
        scale_at = 1 if node.op_type == "Upsample" or self.m.opset < 11 else 2
        names = list(node.input) + [""] * 4
        scales = self.m.array(names[scale_at]) if names[scale_at] else None
        sizes = self.m.array(names[3]) if scale_at == 2 and names[3] else None
        if scales is not None and scales.size:
            if scales.reshape(-1)[pos] != 1:
                raise Block(f"{where} scales the channels")
        elif sizes is not None:
            self.fixups.append(Fixup(node, 3, pos, lambda kept, ids=t.ids: kept(ids)))
        else:
            raise Block(f"{where} has computed scales")
        return {node.output[0]: t}

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
        if node.op_type == "Conv" and group == t.size == w.shape[0] and w.shape[1] == 1:
            # Depthwise: channel c in, channel c out, one filter each. Pruning the
            # input's channel c removes the filter and output c, and `group` follows.
            if node.name in self.m.excluded:
                raise Block(f"consumer {label(node)} is excluded")
            self.member(node, 1, 0, t.ids, "out")
            if len(node.input) > 2 and node.input[2]:
                self.member(node, 2, 0, t.ids, "param")
            self.fixups.append(Fixup(node, "group", None, lambda kept, ids=t.ids: kept(ids)))
            self.sources.append(Source(node, t.ids))
            return {node.output[0]: Track(t.axis, t.ids, w.ndim)}
        raise Block(f"it feeds grouped {where} (groups would be unbalanced)")

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
        if a is not None and b is not None and a.axis == -1 and b.axis == -2:
            if a.size != b.size:
                raise Block(f"{where} contracts tensors whose channels do not line up")
            self.union(a.ids, b.ids)
            return {}
        tracked = [t for t in (a, b) if t is not None]
        ref = tracked[0]
        if any(t.axis > -3 or t.axis != ref.axis or t.size != ref.size for t in tracked):
            raise Block(f"{where} multiplies over the channels")
        for t in tracked[1:]:
            self.union(ref.ids, t.ids)
        if len(tracked) == 1:  # the other operand must broadcast along the channels
            other = node.input[1] if a is not None else node.input[0]
            dims = self.m.dims(other)
            if dims is None or (len(dims) >= -ref.axis and dims[ref.axis] != 1):
                raise Block(f"{where} meets an operand whose channels are not tracked")
        rank = max(ra, rb)
        return {node.output[0]: Track(ref.axis, ref.ids, rank)}


HANDLERS: dict[str, Callable[..., dict[str, Track]]] = {
    "Conv": Discovery._conv,
    "ConvTranspose": Discovery._conv,
    "Gemm": Discovery._gemm,
    "MatMul": Discovery._matmul,
    "Transpose": Discovery._transpose,
    "Flatten": Discovery._flatten,
    "Reshape": Discovery._reshape,
    "Shape": Discovery._shape,
    "Gather": Discovery._gather,
    "Unsqueeze": Discovery._unsqueeze,
    "Squeeze": Discovery._squeeze,
    "Concat": Discovery._concat,
    "Split": Discovery._split,
    "Slice": Discovery._slice,
    "Pad": Discovery._pad,
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

    def reached_layers(self) -> list[onnx.NodeProto]:
        """Weight layers with an input or output slice in a prunable group."""
        ok = {grp.root for grp in self.prunable}
        hit = {
            id(mem.node)
            for mem in self.d.members.values()
            if mem.index == 1 and mem.role in ("in", "out")
            if any(int(r) in ok for r in np.unique(self.group_of[mem.ids]))
        }
        return [n for n in self.d.layers if id(n) in hit]


def identities_to_initializers(model: onnx.ModelProto) -> int:
    """Turn `Identity(constant)` nodes of the main graph into initializers of their own.

    The torch exporter writes one initializer for equal constants (e.g. the
    zero biases of untrained layers) and an Identity per extra reader; each
    reader must be free to slice its own copy.
    """
    graph = model.graph
    inits = g.initializer_map(graph)
    keep, converted = [], 0
    for node in graph.node:
        src = node.input[0] if node.op_type == "Identity" and node.input else ""
        if src in inits and node.output[0] not in {o.name for o in graph.output}:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[src])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            converted += 1
        else:
            keep.append(node)
    if converted:
        del graph.node[:]
        graph.node.extend(keep)
    return converted


# Ops whose all-constant integer results exporters leave in the graph (pads,
# shapes and bounds computed from constants) and that are cheap to evaluate.
FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Cast", "Concat", "ConstantOfShape", "Gather",
    "Reshape", "Slice", "Squeeze", "Unsqueeze", "Transpose", "Range", "Identity",
}  # fmt: skip
FOLD_LIMIT = 4096


def fold_integer_constants(model: onnx.ModelProto) -> int:
    """Evaluate main-graph nodes that compute small integer tensors from constants only.

    F.pad at opset 11 writes its pads as a chain of Concat/Reshape/Slice/Cast
    over constants: once folded, Pad's pads are a constant the pruner can read.
    Float results are never folded, so weights keep their exact values.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = g.initializer_map(graph)
    outputs = {o.name for o in graph.output}
    keep, folded = [], 0
    for node in graph.node:
        ready = (
            node.op_type in FOLDABLE
            and node.domain in ("", "ai.onnx")
            and node.input
            and all(name in inits for name in node.input if name)
            and all(int(np.prod(inits[n].dims)) <= FOLD_LIMIT for n in node.input if n)
            and not any(o in outputs for o in node.output)
        )
        values = None
        if ready:
            try:
                feeds = {n: numpy_helper.to_array(inits[n]) for n in node.input if n}
                values = ReferenceEvaluator(_single_node_model(model, node, feeds)).run(None, feeds)
            except Exception:
                values = None
        if values is None or not all(
            np.issubdtype(np.asarray(v).dtype, np.integer) and np.size(v) <= FOLD_LIMIT
            for v in values
        ):
            keep.append(node)
            continue
        for name, value in zip(node.output, values, strict=True):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(tensor)
            inits[name] = tensor
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _single_node_model(
    model: onnx.ModelProto, node: onnx.NodeProto, feeds: dict[str, np.ndarray]
) -> onnx.ModelProto:
    inputs = [
        onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)
        )
        for name, arr in feeds.items()
    ]
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import))


def discover(model: onnx.ModelProto, excluded: set[str]) -> Groups:
    """Find the dependency groups of `model` (its Split nodes may gain explicit sizes)."""
    m = Model.of(model, excluded)
    d = Discovery(m).run()
    roots = d.chan.roots()
    group_of = np.array([d.grp.find(i) for i in range(len(roots))], dtype=np.int64)
    blocked: dict[int, str] = {}
    for ids, reason in d.blocked:
        for gid in np.unique(group_of[ids]).tolist():
            blocked.setdefault(int(gid), reason)
    by_group: dict[int, Group] = {}
    for src in d.sources:
        gid = int(group_of[src.ids[0]]) if len(src.ids) else -1
        if gid < 0:
            continue
        grp = by_group.setdefault(gid, Group(gid, [], [], blocked.get(gid)))
        if all(p is not src.node for p in grp.producers):
            grp.producers.append(src.node)
    for grp in by_group.values():
        members = np.flatnonzero(group_of == grp.root)
        units, counts = np.unique(roots[members], return_counts=True)
        grp.units = [int(u) for u in units]
        # ids per unit and producer: > 1 only where a unit spans several channels (heads)
        first = next(s for s in d.sources if int(group_of[s.ids[0]]) == grp.root)
        grp.unit_width = max(1, len(first.ids) // max(1, len(np.unique(roots[first.ids]))))
        del counts
    return Groups(d, list(by_group.values()), roots, group_of)
