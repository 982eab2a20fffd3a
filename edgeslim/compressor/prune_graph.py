"""Structured pruning: the graph as discovery sees it, and the records it writes.

`Model` holds the lookups over the main graph (with shapes from ONNX shape
inference, and from one probe run where inference gives up); `Track`,
`Member` and `Fixup` are what discovery attaches to tensors, initializers and
attributes. The clean-ups here (reading shared constants directly, folding
integer constant subgraphs) keep the function of the model and make more of it
followable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.compressor import graph as g

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
# `Model.entries` reads shape vectors: a few entries, a few ops deep.
ENTRY_LIMIT = 64
ENTRY_DEPTH = 16


def _where(cond: int | None, a: int | None, b: int | None) -> int | None:
    if cond is None:
        return a if a == b else None
    return a if cond else b


def _known(
    f: Callable[[int, int], int | None],
) -> Callable[[int | None, int | None], int | None]:
    def known(a: int | None, b: int | None) -> int | None:
        value = None if a is None or b is None else f(a, b)
        return None if value is None else int(value)

    return known


ELEMENTWISE_ENTRIES: dict[str, Callable[..., int | None]] = {
    "Equal": _known(lambda a, b: a == b),
    "Add": _known(lambda a, b: a + b),
    "Sub": _known(lambda a, b: a - b),
    "Mul": _known(lambda a, b: a * b),
    "Div": _known(lambda a, b: abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1) if b else None),
    "Where": _where,
}


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

    def dims(self, name: str, need: tuple[int, ...] | None = None) -> list[int | None] | None:
        """Dims of a tensor: constants exactly, activations from shape inference, with
        a single probe run through onnxruntime filling in what inference left unknown.

        `need` names the axes the caller reads (None: all); the probe only runs
        when one of those is unknown.
        """
        arr = self.array(name)
        if arr is not None:
            return list(arr.shape)
        known = self.shapes.get(name)
        if known is not None:
            axes = range(len(known)) if need is None else need
            if all(known[a] is not None for a in axes if -len(known) <= a < len(known)):
                return known
        if self.probed is None:
            self.probed = probe_shapes(self.model)
        probed = self.probed.get(name)
        if probed is not None and (known is None or len(known) == len(probed)):
            # Only the dims inference could not tell come from the probe.
            return [k if k is not None else p for k, p in zip(known or probed, probed, strict=True)]
        return known

    def elem_type(self, name: str) -> int:
        """The element type of a float activation: declared, or that of the first Cast
        or float constant found walking back along first inputs (float32 if none)."""
        declared = {v.name: v for v in (*self.graph.value_info, *self.graph.input)}
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            info = declared.get(name)
            if info is not None and info.type.tensor_type.elem_type:
                return info.type.tensor_type.elem_type
            node = self.producers.get(name)
            if node is None or not node.input:
                break
            if node.op_type == "Cast":
                return int(next(a.i for a in node.attribute if a.name == "to"))
            for i in node.input:
                init = self.inits.get(i)
                if init is not None and init.data_type in FLOAT_TYPES:
                    return init.data_type
            name = node.input[0]
        return onnx.TensorProto.FLOAT

    def rank(self, name: str) -> int | None:
        dims = self.dims(name, need=())
        return None if dims is None else len(dims)

    def entries(self, name: str, depth: int = 0) -> list[int | None] | None:
        """The values of a small integer vector (a shape, an index) as far as they
        are known without running the model: constants, and what Concat, Gather,
        Where, ... make of them. An entry is None where it is only known at run time
        (a batch size that Shape reads); the result is None for anything else."""
        arr = self.array(name)
        if arr is not None:
            if arr.size > ENTRY_LIMIT or arr.dtype.kind not in "iub":
                return None
            return [int(v) for v in arr.reshape(-1)]
        node = self.producers.get(name)
        if node is None or depth > ENTRY_DEPTH or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type

        def of(i: int) -> list[int | None] | None:
            return self.entries(node.input[i], depth + 1) if len(node.input) > i else None

        if op == "Shape":
            # Static dims from inference only (a probe's batch size is made up). A
            # channel count read here blocks its group in discovery anyway.
            rank = self.rank(node.input[0])
            dims = self.shapes.get(node.input[0]) or [None] * (rank or 0)
            if rank is None or len(dims) != rank:
                return None
            return dims[slice(attr(node, "start"), attr(node, "end"))]
        if op in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape"):
            return of(0)
        if op == "Concat":
            parts = [of(i) for i in range(len(node.input))]
            return None if any(p is None for p in parts) else [v for p in parts for v in p]
        if op == "Gather":
            data, idx = of(0), self.array(node.input[1])
            if data is None or idx is None or attr(node, "axis", 0) != 0:
                return None
            picked = [int(i) for i in idx.reshape(-1)]
            return (
                None
                if any(not -len(data) <= i < len(data) for i in picked)
                else [data[i] for i in picked]
            )
        if op == "ConstantOfShape":
            shape, value = of(0), attr(node, "value")
            fill = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value)
            if shape is None or len(shape) != 1 or shape[0] is None or shape[0] > ENTRY_LIMIT:
                return None
            return [int(fill.reshape(-1)[0])] * shape[0] if fill.dtype.kind in "iub" else None
        if op in ELEMENTWISE_ENTRIES:
            known = [of(i) for i in range(len(node.input))]
            parts = [p for p in known if p is not None]
            n = max((len(p) for p in parts), default=0)
            if len(parts) != len(known) or any(len(p) not in (1, n) for p in parts):
                return None
            rows = zip(*(p * n if len(p) == 1 else p for p in parts), strict=True)
            return [ELEMENTWISE_ENTRIES[op](*row) for row in rows]
        return None


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
    outputs = [out for node in model.graph.node for out in node.output if out]
    values = probe_values(model, outputs, batch=2)
    return {name: list(np.shape(value)) for name, value in values.items()}


def probe_values(model: onnx.ModelProto, names: list[str], batch: int) -> dict[str, np.ndarray]:
    """The values of the tensors `names` on made-up inputs whose symbolic dims are
    `batch` on the leading axis and 16 elsewhere; empty on any failure."""
    try:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        del work.graph.value_info[:]
        present = {o.name for o in work.graph.output}
        for out in names:
            if out not in present:
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
                d.dim_value if d.HasField("dim_value") else (batch if i == 0 else 16)
                for i, d in enumerate(tt.shape.dim)
            ]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feeds[vi.name] = rng.normal(size=dims).astype(dtype)
            else:
                feeds[vi.name] = np.ones(dims, dtype=dtype)
        session = unoptimized_session(work)
        wanted = set(names)
        outs = [o.name for o in session.get_outputs() if o.name in wanted]
        return dict(zip(outs, session.run(outs, feeds), strict=True))
    except Exception:
        return {}


def unoptimized_session(model: onnx.ModelProto):
    """An onnxruntime session on `model` as written: one thread, no graph optimization
    (so every tensor asked for as an output is the graph's own), errors only on stderr
    (a warning per unused constant reached the user's terminal)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Track:
    """The channel axis of one tensor and the id of each index along it."""

    axis: int
    """Negative axis of the channel dimension."""
    ids: np.ndarray
    rank: int | None
    folded: bool = False
    """The axis holds the batch too, outside the channels (heads folded into the
    batch axis, see `prune_folded`): n copies of the ids in a row at run time."""

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
class Renumber:
    """The constant indices at `node.input[1]` point into channels with these `ids`:
    once cut, each remaining index is renumbered to its channel's new position."""

    node: onnx.NodeProto
    ids: np.ndarray


def identities_to_initializers(model: onnx.ModelProto) -> int:
    """Turn `Identity(constant)` nodes of the main graph into initializers of their own.

    The torch exporter writes one initializer for a parameter used in several
    places (ALBERT's layers) and for equal constants alike (the zero biases of
    untrained layers), with an Identity per extra reader. Each gets a copy here;
    `graph.merge_duplicate_initializers`, run next, merges the copies of any
    constant that is not one repeated value back into one, so layers that share
    a weight read it directly, while each merged zero or one stays free to be cut
    its own way.
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
            inits[tensor.name] = tensor  # an Identity of this copy reads it too
            converted += 1
        else:
            keep.append(node)
    if converted:
        del graph.node[:]
        graph.node.extend(keep)
    return converted


def drop_needless_allowzero(model: onnx.ModelProto) -> int:
    """Clear `allowzero` on main-graph Reshapes whose constant target has no 0.

    torch's dynamo exporter sets it on every Reshape; it only changes what a 0 in
    the target means, so without one it changes nothing, and the layout rules
    (which read a 0 as "this input dim") can follow the Reshape."""
    inits = g.initializer_map(model.graph)
    cleared = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        flag = next((a for a in node.attribute if a.name == "allowzero"), None)
        if flag is not None and flag.i and 0 not in numpy_helper.to_array(inits[node.input[1]]):
            flag.i = 0
            cleared += 1
    return cleared


def identity_gathers_to_reshapes(model: onnx.ModelProto) -> int:
    """Write `Gather(x, arange(n) shaped S)` of a 1-D x of length n as `Reshape(x, S)`.

    torch's dynamo exporter writes `as_strided` that way (ConvNeXt's head: the
    pooled [1, C, 1, 1] flattened, then gathered back whole); it picks every element
    once, in order, so it is a Reshape, which the layout rules follow."""
    graph = model.graph
    inits = g.initializer_map(graph)
    candidates = []
    for node in graph.node:
        if node.op_type != "Gather" or attr(node, "axis", 0) != 0 or node.input[1] not in inits:
            continue
        idx = numpy_helper.to_array(inits[node.input[1]])
        if idx.ndim > 1 and idx.size and np.array_equal(idx.reshape(-1), np.arange(idx.size)):
            candidates.append((node, idx.shape))
    rewritten = _computed_identity_gathers(model)
    if not candidates:
        return rewritten
    shapes = infer_shapes(model)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    for node, shape in candidates:
        if shapes.get(node.input[0]) != [int(np.prod(shape))]:
            continue
        target = fresh_name(f"{node.name or node.output[0]}_shape", names)
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), target))
        node.op_type = "Reshape"
        node.input[1] = target
        del node.attribute[:]
        rewritten += 1
    return rewritten


def _computed_identity_gathers(model: onnx.ModelProto) -> int:
    """The same with a dynamic batch: `Gather(Reshape(x, [-1]), idx)` where idx is
    computed at run time (dynamo writes `as_strided` of a [B, C, 1, 1] as
    Range(0, B) * C unsqueezed plus arange(C)). Where idx is arange(x.size) shaped
    like x at two batch sizes, the Gather becomes `Reshape(flat, Shape(x))`, which
    a layout run follows (its sizes are read from x itself)."""
    graph = model.graph
    inits = g.initializer_map(graph)
    producers = g.producers(graph)
    candidates = []
    for node in graph.node:
        flat = producers.get(node.input[0]) if node.op_type == "Gather" else None
        if (
            flat is None
            or attr(node, "axis", 0) != 0
            or node.input[1] in inits
            or flat.op_type != "Reshape"
            or flat.input[1] not in inits
            or numpy_helper.to_array(inits[flat.input[1]]).tolist() != [-1]
        ):
            continue
        candidates.append((node, flat.input[0]))
    if not candidates:
        return 0
    wanted = [name for node, x in candidates for name in (node.input[1], x)]
    runs = [probe_values(model, wanted, batch) for batch in (2, 3)]

    def identity(node: onnx.NodeProto, x: str) -> bool:
        for values in runs:
            idx, data = values.get(node.input[1]), values.get(x)
            if idx is None or data is None or idx.shape != data.shape:
                return False
            if not np.array_equal(idx.reshape(-1), np.arange(data.size)):
                return False
        return True

    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    rewritten = 0
    for node, x in candidates:
        if not identity(node, x):
            continue
        out = fresh_name(f"{node.name or node.output[0]}_shape", names)
        shape = onnx.helper.make_node("Shape", [x], [out], name=out)
        graph.node.insert(list(graph.node).index(node), shape)
        idx = node.input[1]
        node.op_type = "Reshape"
        node.input[1] = shape.output[0]
        del node.attribute[:]
        _drop_unread(graph, idx)
        rewritten += 1
    return rewritten


def _drop_unread(graph: onnx.GraphProto, name: str) -> None:
    """Remove the node computing `name` where nothing reads it any more, and so on up
    through its inputs (the index arithmetic a rewrite left behind)."""
    outputs = {o.name for o in graph.output} | _read_in_subgraphs(graph)
    pending = [name]
    while pending:
        tensor = pending.pop()
        readers = [n for n in graph.node if tensor in n.input]
        node = next((n for n in graph.node if tensor in n.output), None)
        if node is None or readers or tensor in outputs:
            continue
        if any(o in outputs or any(o in n.input for n in graph.node) for o in node.output):
            continue
        graph.node.remove(node)
        pending.extend(i for i in node.input if i)


def _read_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Names that nodes inside If / Loop / Scan bodies read (from the outer scope too)."""
    return {
        name
        for sub in g.iter_graphs(graph)
        if sub is not graph
        for n in sub.node
        for name in n.input
    }


# Ops whose all-constant integer results exporters leave in the graph (pads,
# shapes and bounds computed from constants) and that are cheap to evaluate.
FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Cast", "Concat", "ConstantOfShape", "Gather",
    "Reshape", "Slice", "Squeeze", "Unsqueeze", "Transpose", "Range", "Identity",
}  # fmt: skip
FOLD_LIMIT = 4096
# Shape arithmetic reads tiny vectors; this bound keeps every folded result
# (broadcasts, gathers) small before it is computed, whatever the model says.
FOLD_INPUT_LIMIT = 64


def fold_integer_constants(model: onnx.ModelProto) -> int:
    """Evaluate main-graph nodes that compute small integer tensors from constants only.

    F.pad at opset 11 writes its pads as a chain of Concat/Reshape/Slice/Cast
    over constants: once folded, Pad's pads are a constant the pruner can read.
    Float results are never folded, so weights keep their exact values.
    """
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
            and all(int(np.prod(inits[n].dims)) <= FOLD_INPUT_LIMIT for n in node.input if n)
            and not any(o in outputs for o in node.output)
            and _bounded(node, inits)
        )
        values = _evaluated(model, node, inits) if ready else None
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


# Ops that only move the elements of their first input: folding one over a constant
# keeps every value exactly and the element count, so nothing grows.
LAYOUT_FOLDABLE = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def fold_constant_layouts(model: onnx.ModelProto) -> int:
    """Evaluate main-graph layout ops over a float constant that nothing else reads.

    torch's dynamo exporter leaves Swin's relative position bias as the gathered
    table [N*N, H], then Reshape [N, N, -1], Transpose and Unsqueeze before the Add
    to the scores; folded, the bias is one constant [1, H, N, N] whose heads axis
    the head groups can cut. The source constant goes, so the file does not grow."""
    graph = model.graph
    inits = g.initializer_map(graph)
    readers = g.consumers(graph)
    outputs = {o.name for o in graph.output} | {i.name for i in graph.input}
    nested = _read_in_subgraphs(graph)
    keep, folded = [], 0
    for node in graph.node:
        data = node.input[0] if node.input else ""
        ready = (
            node.op_type in LAYOUT_FOLDABLE
            and node.domain in ("", "ai.onnx")
            and data in inits
            and inits[data].data_type in FLOAT_TYPES
            and len(readers.get(data, [])) == 1
            and data not in outputs | nested
            and all(name in inits for name in node.input[1:] if name)
            and not any(o in outputs for o in node.output)
        )
        values = _evaluated(model, node, inits) if ready else None
        if values is None or len(values) != 1:
            keep.append(node)
            continue
        tensor = numpy_helper.from_array(np.asarray(values[0]), node.output[0])
        graph.initializer.append(tensor)
        inits[node.output[0]] = tensor
        graph.initializer.remove(inits.pop(data))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def fresh_name(base: str, names: set[str]) -> str:
    """`base`, or `base2`, `base3`, ... : the first not in `names` (which gains it)."""
    name, n = base, 1
    while name in names:
        n += 1
        name = f"{base}{n}"
    names.add(name)
    return name


def shuffles_to_gathers(model: onnx.ModelProto) -> list[str]:
    """Write each channel shuffle as one Gather of its channels; the Gathers' names.

    ShuffleNet's shuffle is Reshape [.., C, ..] -> [.., G, C/G, ..], a Transpose
    swapping those two axes, and a Reshape back. Kept as it is, it forces every
    one of the G blocks to keep the same channels, and the blocks of one stage
    interleave, so that constraint doubles at each unit until the whole stream
    is one channel group. A Gather with the same permutation computes the same
    tensor and takes any subset: the pruner then cuts its indices like a weight.
    """
    graph = model.graph
    m = Model.of(model, set())

    def only_reader(name: str, op: str) -> onnx.NodeProto | None:
        readers = m.consumers.get(name, [])
        # The one reader anywhere: no graph output, no If/Loop/Scan body reads it.
        ok = len(readers) == 1 and m.uses(name) == 1 and readers[0].op_type == op
        return readers[0] if ok else None

    def target(node: onnx.NodeProto) -> list[int] | None:
        value = m.array(node.input[1]) if len(node.input) > 1 else None
        if value is None or attr(node, "allowzero", 0):
            return None
        return [int(v) for v in value.reshape(-1)]

    names = set(m.inits) | set(m.producers) | m.graph_inputs
    drop: set[int] = set()
    written: list[str] = []
    for split in graph.node:
        if split.op_type != "Reshape" or (dims := m.shapes.get(split.input[0])) is None:
            continue
        swap = only_reader(split.output[0], "Transpose")
        merge = swap and only_reader(swap.output[0], "Reshape")
        if not swap or not merge:
            continue
        p = _shuffled_axis(dims, target(split), attr(swap, "perm"), target(merge))
        if p is None:
            continue
        groups = target(split)[p]  # type: ignore[index]
        order = np.arange(dims[p]).reshape(groups, -1).T.reshape(-1)  # type: ignore[arg-type]
        indices = fresh_name(f"{merge.name or merge.output[0]}_channel_order", names)
        graph.initializer.append(numpy_helper.from_array(order.astype(np.int64), indices))
        gather = onnx.helper.make_node(
            "Gather", [split.input[0], indices], [merge.output[0]], name=merge.name, axis=p
        )
        merge.CopyFrom(gather)
        drop.update((id(split), id(swap)))
        written.append(merge.name or merge.output[0])
    if drop:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return written


def _shuffled_axis(
    dims: list[int | None], split: list[int] | None, perm: object, merge: list[int] | None
) -> int | None:
    """The axis p that Reshape(split) -> Transpose(perm) -> Reshape(merge) shuffles
    (every other axis restated as it is, p not the batch axis), else None."""
    rank = len(dims)
    if split is None or merge is None or len(split) != rank + 1 or len(merge) != rank:
        return None
    for p in range(1, rank):
        swapped = list(range(rank + 1))
        swapped[p], swapped[p + 1] = p + 1, p
        c = dims[p]
        if (
            c is not None
            and list(perm or []) == swapped
            and split[p] > 1
            and split[p + 1] > 0
            and split[p] * split[p + 1] == c
            and _restates(dims[:p] + dims[p + 1 :], split[:p] + split[p + 2 :])
            and merge[p] in (c, -1)
            and _restates(dims[:p] + dims[p + 1 :], merge[:p] + merge[p + 1 :])
            and merge.count(-1) <= 1
        ):
            return p
    return None


def _restates(dims: list[int | None], values: list[int]) -> bool:
    """Whether Reshape target `values` keeps each of `dims` as it is (at most one -1)."""
    if values.count(-1) > 1:
        return False
    return all(v == -1 or (d is not None and v == d) for d, v in zip(dims, values, strict=True))


def _bounded(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether the node's result is known to stay under FOLD_LIMIT elements (the two
    ops whose output size is an input *value*)."""
    try:
        args = [numpy_helper.to_array(inits[n]) if n else None for n in node.input]
        if node.op_type == "ConstantOfShape":
            return int(np.prod(args[0])) <= FOLD_LIMIT and bool((args[0] >= 0).all())
        if node.op_type == "Range":
            start, limit, delta = (float(a) for a in args[:3])
            return delta != 0 and (limit - start) / delta <= FOLD_LIMIT
    except (ValueError, TypeError, IndexError, OverflowError):
        return False
    return True


def _evaluated(
    model: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
) -> list | None:
    """The outputs of `node` on its constant inputs (onnx's reference evaluator), or
    None where it cannot be evaluated."""
    from onnx.reference import ReferenceEvaluator

    try:
        feeds = {n: numpy_helper.to_array(inits[n]) for n in node.input if n}
        return ReferenceEvaluator(_single_node_model(model, node, feeds)).run(None, feeds)
    except Exception:
        return None


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
