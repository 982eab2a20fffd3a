"""Structured pruning: remove whole output channels (Conv) and neurons (Gemm/MatMul).

Removing channel c of a layer changes the shape of every tensor derived from
its output, so each consumer must be cut the same way. For one candidate layer
we *trace* the pruned tensor through ops that keep channels independent
(activations, pooling, BatchNormalization, Add/Mul with per-channel constants,
Flatten...) until it reaches the weight layers that read it, collecting the
initializer slices that keep the graph consistent. If any path reaches
something we cannot rewrite exactly (a graph output, Concat, a residual Add,
Transpose, Softmax, a grouped Conv...) the layer is left alone and the reason is
reported: pruning a layer whose consumers cannot follow would break the model.

Channel positions are tracked as *negative* axes, because ONNX broadcasting
aligns shapes from the right: a per-channel constant of shape [C, 1, 1] lines
up with axis -3 of an [N, C, H, W] tensor whatever the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.compressor import graph as g

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}

# One input, one output, element by element: the channel layout passes unchanged.
# Extra inputs (Clip's min/max, Dropout's ratio) must be scalars.
ELEMENTWISE_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish",
    "ThresholdedRelu", "Identity", "Cast", "Dropout",
}  # fmt: skip
# Element-wise with broadcasting: fine with per-channel constants, and with other
# activations only when they carry exactly the same cut (e.g. x * erf(x) in GELU).
ELEMENTWISE_NARY = {"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean"}
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


class Unsupported(Exception):
    """The pruned tensor reaches something we cannot rewrite: the layer is skipped."""


@dataclass(frozen=True)
class Cut:
    """Which indices along one axis of a tensor are removed."""

    axis: int
    """Negative axis of the channel dimension."""
    size: int
    """Length of that axis before pruning."""
    removed: tuple[int, ...]
    rank: int | None = None
    """Rank of the tensor when known (needed by ops that index axes from the left)."""

    def keep(self) -> np.ndarray:
        mask = np.ones(self.size, dtype=bool)
        mask[list(self.removed)] = False
        return np.flatnonzero(mask)

    def same_layout(self, other: Cut) -> bool:
        return (self.axis, self.size, self.removed) == (other.axis, other.size, other.removed)

    def positive_axis(self, why: str) -> int:
        if self.rank is None:
            raise Unsupported(f"rank unknown at {why}")
        return self.rank + self.axis


@dataclass
class Edit:
    """Keep only `keep` along `axis` of the initializer at `node.input[index]`."""

    node: onnx.NodeProto
    index: int
    axis: int
    keep: np.ndarray


@dataclass
class Layer:
    """A prunable layer: its weight edit(s) and the cut of its output."""

    node: onnx.NodeProto
    out_channels: int
    scores: np.ndarray
    """Importance per output channel (L1 or L2 norm); the lowest are removed."""
    weight_index: int
    weight_axis: int
    bias_index: int | None
    out_axis: int
    out_rank: int | None


@dataclass
class Model:
    """Lookup tables over the main graph, built once per pruning pass."""

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
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

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
        return cls(
            graph=graph,
            inits=g.initializer_map(graph),
            consumers=g.consumers(graph),
            producers=g.producers(graph),
            shapes=infer_shapes(model),
            outputs={o.name for o in graph.output},
            graph_inputs={i.name for i in graph.input},
            subgraph_refs=refs,
            excluded=excluded,
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


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where symbolic); empty when inference fails.

    Only the Flatten/Reshape mapping and rank-dependent ops need it; without
    shapes those paths are refused, never guessed.
    """
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


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type} -> {node.output[0]}"


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------------------
# Candidate layers


def candidate(m: Model, node: onnx.NodeProto, l2: bool) -> Layer | None:
    """The layer's prunable shape, or None when it is not a Conv/Gemm/MatMul with a
    constant float weight; raises Unsupported for grouped Convs."""
    if node.op_type == "Conv" and len(node.input) > 1:
        w = m.float_weight(node.input[1])
        if w is None or w.ndim < 3:
            return None
        if attr(node, "group", 1) != 1:
            # Removing output channels of a grouped Conv would unbalance its groups.
            raise Unsupported("grouped/depthwise Conv")
        # [N, C, *spatial]: the channel axis is -(number of spatial dims + 1).
        return _layer(node, w, 0, l2, _opt(node, 2), out_axis=-(w.ndim - 1), out_rank=w.ndim)
    if node.op_type == "Gemm":
        w = m.float_weight(node.input[1])
        if w is None or w.ndim != 2 or m.array(node.input[0]) is not None:
            return None
        axis = 0 if attr(node, "transB", 0) else 1  # B is [N, K] with transB, else [K, N]
        return _layer(node, w, axis, l2, _opt(node, 2), out_axis=-1, out_rank=2)
    if node.op_type == "MatMul":
        w = m.float_weight(node.input[1])
        if w is None or w.ndim < 2 or m.array(node.input[0]) is not None:
            return None
        shape = m.shapes.get(node.output[0])
        rank = len(shape) if shape else None
        # The bias, if any, is a separate Add: the trace slices it as a per-channel constant.
        return _layer(node, w, w.ndim - 1, l2, None, out_axis=-1, out_rank=rank)
    return None


def _layer(
    node: onnx.NodeProto,
    w: np.ndarray,
    axis: int,
    l2: bool,
    bias_index: int | None,
    out_axis: int,
    out_rank: int | None,
) -> Layer:
    return Layer(
        node=node,
        out_channels=w.shape[axis],
        scores=_norms(w, axis, l2),
        weight_index=1,
        weight_axis=axis,
        bias_index=bias_index,
        out_axis=out_axis,
        out_rank=out_rank,
    )


def _opt(node: onnx.NodeProto, index: int) -> int | None:
    return index if len(node.input) > index and node.input[index] else None


def _norms(w: np.ndarray, axis: int, l2: bool) -> np.ndarray:
    """L1 or L2 norm of each slice of `w` along `axis`."""
    flat = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.sqrt((flat**2).sum(1)) if l2 else np.abs(flat).sum(1)


def channels_to_remove(layer: Layer, sparsity: float) -> tuple[int, ...]:
    """The round(sparsity * O) lowest-scoring channels, keeping at least one."""
    n = min(math.floor(sparsity * layer.out_channels + 0.5), layer.out_channels - 1)
    if n <= 0:
        return ()
    order = np.argsort(layer.scores, kind="stable")  # ties: lower index first
    return tuple(sorted(int(i) for i in order[:n]))


def plan_layer(m: Model, layer: Layer, removed: tuple[int, ...]) -> list[Edit]:
    """All initializer slices that remove `removed` channels of `layer`; raises Unsupported."""
    node = layer.node
    if node.output[0] in m.outputs:
        raise Unsupported("its output is a graph output")
    weight = node.input[layer.weight_index]
    if weight in m.graph_inputs:
        raise Unsupported("its weight is also a graph input (overridable at run time)")
    if m.uses(weight) > 1:
        raise Unsupported("its weight is shared with other nodes")
    cut = Cut(layer.out_axis, layer.out_channels, removed, layer.out_rank)
    edits = [Edit(node, layer.weight_index, layer.weight_axis, cut.keep())]
    if layer.bias_index is not None:
        bias = m.array(node.input[layer.bias_index])
        if bias is None:
            raise Unsupported("its bias is computed, not a constant")
        if node.op_type == "Conv":  # Conv's B is exactly [O]
            edits.append(Edit(node, layer.bias_index, 0, cut.keep()))
        else:  # Gemm's C broadcasts to [M, N]
            edits += _broadcast_edit(node, layer.bias_index, bias, cut)
    return edits + Tracer(m).trace(node.output[0], cut)


# ---------------------------------------------------------------------------
# Tracing a cut through the graph


class Tracer:
    def __init__(self, m: Model) -> None:
        self.m = m
        self.cuts: dict[str, Cut] = {}
        self.edits: list[Edit] = []
        self.visited: set[int] = set()
        # (node, cut it was reached with): inputs that must carry the same cut.
        self.pending: list[tuple[onnx.NodeProto, Cut]] = []

    def trace(self, tensor: str, cut: Cut) -> list[Edit]:
        queue = [(tensor, cut)]
        while queue:
            name, cut = queue.pop()
            if name in self.cuts:
                if not self.cuts[name].same_layout(cut):
                    raise Unsupported(f"tensor {name} would be cut two different ways")
                continue
            self.cuts[name] = cut
            self._check_escape(name)
            for node in self.m.consumers.get(name, []):
                if id(node) in self.visited:
                    continue
                self.visited.add(id(node))
                queue.extend(self._visit(node, name, cut))
        self._check_pending()
        return self.edits

    def _check_escape(self, name: str) -> None:
        if name in self.m.outputs:
            raise Unsupported(f"its output reaches graph output {name!r}")
        if name in self.m.subgraph_refs:
            raise Unsupported(f"its output is used inside an If/Loop/Scan body ({name})")

    def _check_pending(self) -> None:
        for node, cut in self.pending:
            for name in node.input:
                if not name or self.m.array(name) is not None:
                    continue
                other = self.cuts.get(name)
                if other is None or not other.same_layout(cut):
                    raise Unsupported(
                        f"its output meets another activation ({name}) at {node.op_type} "
                        f"{label(node)} (residual or branch merge)"
                    )

    def _visit(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        """Handle one consumer; return the tensors it passes the cut on to."""
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"its output reaches custom op {node.domain}.{op} {label(node)}")
        if node.name in self.m.excluded:
            raise Unsupported(f"consumer {label(node)} is excluded")
        if op in ELEMENTWISE_UNARY:
            return self._unary(node, name, cut)
        if op in ELEMENTWISE_NARY:
            return self._nary(node, cut)
        if op in POOLS:
            return self._pool(node, name, cut)
        if op in CHANNEL_NORMS:
            return self._norm(node, name, cut)
        if op in REDUCES:
            return self._reduce(node, name, cut)
        if op == "Flatten":
            return self._flatten(node, name, cut, int(attr(node, "axis", 1)))
        if op == "Reshape":
            return self._reshape(node, name, cut)
        if op == "Shape":
            return self._shape(node, cut)
        if op in ("Conv", "ConvTranspose"):
            return self._conv_input(node, name, cut)
        if op == "Gemm":
            return self._gemm_input(node, name, cut)
        if op == "MatMul":
            return self._matmul_input(node, name, cut)
        raise Unsupported(f"its output reaches {op} {label(node)}, which cannot follow the cut")

    # -- pass-through ops ---------------------------------------------------

    def _unary(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        if node.input[0] != name or any(self._size(i) != 1 for i in node.input[1:] if i):
            raise Unsupported(f"{node.op_type} {label(node)} has non-scalar extra inputs")
        # Dropout's mask has the data's shape too, so it carries the same cut.
        return [(out, cut) for out in node.output if out]

    def _size(self, name: str) -> int | None:
        arr = self.m.array(name)
        return None if arr is None else arr.size

    def _nary(self, node: onnx.NodeProto, cut: Cut) -> list[tuple[str, Cut]]:
        rank = cut.rank
        for i, inp in enumerate(node.input):
            arr = self.m.array(inp)
            if arr is None:
                continue  # an activation: checked once the whole trace is known
            self.edits += _broadcast_edit(node, i, arr, cut)
            rank = None if rank is None else max(rank, arr.ndim)
        self.pending.append((node, cut))
        return [(node.output[0], Cut(cut.axis, cut.size, cut.removed, rank))]

    def _require_channel_axis(self, node: onnx.NodeProto, cut: Cut) -> None:
        if cut.positive_axis(f"{node.op_type} {label(node)}") != 1:
            raise Unsupported(f"{node.op_type} {label(node)} sees the cut on a non-channel axis")

    def _pool(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        self._require_channel_axis(node, cut)
        self._only_first_output(node)
        return [(node.output[0], cut)]

    def _only_first_output(self, node: onnx.NodeProto) -> None:
        # MaxPool's Indices encode flat positions; BN's training outputs are stats.
        for out in node.output[1:]:
            if out and (self.m.consumers.get(out) or out in self.m.outputs):
                raise Unsupported(f"extra output {out} of {label(node)} is used")

    def _norm(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        if node.input[0] != name:
            raise Unsupported(f"it feeds a parameter of {node.op_type} {label(node)}")
        self._require_channel_axis(node, cut)
        self._only_first_output(node)
        for i in CHANNEL_NORMS[node.op_type]:
            arr = self.m.array(node.input[i])
            if arr is None or arr.shape != (cut.size,):
                raise Unsupported(f"parameters of {label(node)} are not per-channel constants")
            self.edits.append(Edit(node, i, 0, cut.keep()))
        return [(node.output[0], cut)]

    def _reduce(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        where = f"{node.op_type} {label(node)}"
        channel = cut.positive_axis(where)
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Unsupported(f"{where} has computed axes")
            axes = arr.tolist()
        if not axes:
            raise Unsupported(f"{where} reduces every axis")
        axes = [a % cut.rank for a in axes]  # type: ignore[operator]
        if channel in axes:
            raise Unsupported(f"{where} reduces over the channels")
        if not attr(node, "keepdims", 1):
            rank = cut.rank - len(axes)  # type: ignore[operator]
            channel -= sum(a < channel for a in axes)
            return [(node.output[0], Cut(channel - rank, cut.size, cut.removed, rank))]
        return [(node.output[0], cut)]

    # -- flattening -----------------------------------------------------------

    def _flatten(
        self, node: onnx.NodeProto, name: str, cut: Cut, axis: int
    ) -> list[tuple[str, Cut]]:
        """[d0..dk-1, dk..] -> [outer, inner]: channel c becomes a set of column indices."""
        where = f"{node.op_type} {label(node)}"
        shape = self.m.shapes.get(name)
        if not shape:
            raise Unsupported(f"shape of {name} unknown at {where}")
        rank = len(shape)
        channel = rank + cut.axis
        axis = axis + rank if axis < 0 else axis
        if channel < axis:
            raise Unsupported(f"{where} folds the channels into the leading axis")
        before, after = shape[axis:channel], shape[channel + 1 :]
        if any(d is None for d in [*before, *after]):
            raise Unsupported(f"spatial size unknown at {where}")
        outer, inner = math.prod(before), math.prod(after)  # type: ignore[arg-type]
        # Column of (o, c, i) in the flattened row is (o * C + c) * inner + i.
        starts = (np.arange(outer)[:, None] * cut.size + np.array(cut.removed)[None, :]) * inner
        removed = (starts.reshape(-1)[:, None] + np.arange(inner)[None, :]).reshape(-1)
        flat = Cut(-1, outer * cut.size * inner, tuple(int(i) for i in removed), 2)
        return [(node.output[0], flat)]

    def _reshape(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        """Only Reshape to [batch, -1], i.e. Flatten(axis=1) written another way."""
        where = f"Reshape {label(node)}"
        if node.input[0] != name:
            raise Unsupported(f"it feeds the shape input of {where}")
        if attr(node, "allowzero", 0) or not self._is_flatten_shape(node):
            raise Unsupported(f"{where} is not a reshape to [batch, -1]")
        return self._flatten(node, name, cut, 1)

    def _is_flatten_shape(self, node: onnx.NodeProto) -> bool:
        data, shape_name = node.input[0], node.input[1]
        target = self.m.array(shape_name)
        if target is not None:
            values = target.reshape(-1).tolist()
            if len(values) != 2 or values[1] != -1:
                return False
            dims = self.m.shapes.get(data)
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
        if not gather or gather.op_type != "Gather" or not self._is_index0(gather):
            return False
        shape = self.m.producers.get(gather.input[0])
        return bool(shape and shape.op_type == "Shape" and shape.input[0] == data)

    def _is_index0(self, gather: onnx.NodeProto) -> bool:
        idx = self.m.array(gather.input[1])
        return attr(gather, "axis", 0) == 0 and idx is not None and idx.reshape(-1).tolist() == [0]

    def _shape(self, node: onnx.NodeProto, cut: Cut) -> list[tuple[str, Cut]]:
        """Reading the batch size of a pruned tensor is fine; anything else is not."""
        start = attr(node, "start", 0)
        readers = self.m.consumers.get(node.output[0], [])
        if (
            start == 0
            and attr(node, "end") is None
            and node.output[0] not in self.m.outputs
            and readers
            and all(r.op_type == "Gather" and self._is_index0(r) for r in readers)
            and cut.positive_axis(f"Shape {label(node)}") != 0
        ):
            return []
        raise Unsupported(f"its shape is read by Shape {label(node)}")

    # -- consuming weight layers ---------------------------------------------

    def _weight(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        w = self.m.array(node.input[index]) if len(node.input) > index else None
        if w is None:
            raise Unsupported(f"{node.op_type} {label(node)} has a computed weight")
        return w

    def _conv_input(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        where = f"{node.op_type} {label(node)}"
        if node.input[0] != name:
            raise Unsupported(f"it is used as a weight of {where}")
        if attr(node, "group", 1) != 1:
            raise Unsupported(f"it feeds grouped/depthwise {where}")
        w = self._weight(node, 1)
        if cut.axis != -(w.ndim - 1) or (cut.rank is not None and cut.rank != w.ndim):
            raise Unsupported(f"{where} sees the cut on a non-channel axis")
        # Conv weights are [O, I, k...]; ConvTranspose weights are [I, O, k...].
        self.edits.append(Edit(node, 1, 1 if node.op_type == "Conv" else 0, cut.keep()))
        return []

    def _gemm_input(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        where = f"Gemm {label(node)}"
        if node.input[0] != name:
            raise Unsupported(f"it is used as B or C of {where}")
        self._weight(node, 1)
        k_axis = -2 if attr(node, "transA", 0) else -1
        if cut.axis != k_axis or (cut.rank is not None and cut.rank != 2):
            raise Unsupported(f"{where} sees the cut on its batch axis")
        self.edits.append(Edit(node, 1, 1 if attr(node, "transB", 0) else 0, cut.keep()))
        return []

    def _matmul_input(self, node: onnx.NodeProto, name: str, cut: Cut) -> list[tuple[str, Cut]]:
        where = f"MatMul {label(node)}"
        if node.input[0] != name or self.m.array(node.input[1]) is None:
            raise Unsupported(f"it is multiplied with another activation at {where}")
        w = self._weight(node, 1)
        if cut.axis != -1 or w.ndim < 2:
            raise Unsupported(f"{where} sees the cut on a non-K axis")
        self.edits.append(Edit(node, 1, w.ndim - 2, cut.keep()))
        return []


def _broadcast_edit(node: onnx.NodeProto, index: int, arr: np.ndarray, cut: Cut) -> list[Edit]:
    """Slice a constant that broadcasts against the cut tensor, if it spans the channels."""
    if arr.ndim < -cut.axis:
        return []  # does not reach the channel axis: same value for every channel
    axis = arr.ndim + cut.axis
    if arr.shape[axis] == 1:
        return []
    if arr.shape[axis] != cut.size:
        raise Unsupported(f"constant {node.input[index]} of {label(node)} does not match")
    return [Edit(node, index, axis, cut.keep())]


# ---------------------------------------------------------------------------
# Surgery


def apply_edits(m: Model, edits: list[Edit]) -> None:
    """Slice the initializers; a constant also read elsewhere is copied first."""
    names = {t.name for t in m.graph.initializer} | set(m.producers) | m.graph_inputs
    for edit in edits:
        name = edit.node.input[edit.index]
        if m.uses(name) > 1:
            name = _private_copy(m, edit, names)
        arr = np.take(m.array(name), edit.keep, axis=edit.axis)
        g.replace_initializer(m.graph, name, np.ascontiguousarray(arr))
        m.arrays[name] = arr
        m.inits = g.initializer_map(m.graph)


def _private_copy(m: Model, edit: Edit, names: set[str]) -> str:
    """Give this node its own copy of a shared constant, so other readers keep theirs."""
    old = edit.node.input[edit.index]
    new, n = f"{old}__pruned", 1
    while new in names:
        n += 1
        new = f"{old}__pruned{n}"
    names.add(new)
    m.graph.initializer.append(numpy_helper.from_array(m.array(old), new))
    edit.node.input[edit.index] = new
    m.consumers[old].remove(edit.node)
    m.consumers[new] = [edit.node]
    m.inits = g.initializer_map(m.graph)
    return new
