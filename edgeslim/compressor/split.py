"""Model parallelism: cut an ONNX graph into parts that run one after another.

A model too big for one edge device runs as a chain: part 0 on one device
takes the model's inputs, each next part takes exactly the previous part's
outputs, the last part answers with the model's outputs. Cuts go between
nodes in the graph's topological order, where

- the parts' parameter bytes balance (the largest part is within
  :data:`BALANCE_SLACK` of the best any choice of cuts allows), or each part
  fits a ``max_part_bytes`` budget;
- and, among those, the tensors crossing the cuts are few and small: every
  byte crossing a cut is sent over the network per request. Sizes come from
  shape inference with every symbolic dim (batch, sequence) set to 1.

A tensor a later part needs (an original input such as BERT's attention mask,
or a skip connection) crosses every cut in between: each part passes it on,
so a part's inputs are exactly the previous part's outputs and a server
chain stays a straight line.

Nodes without inputs (``Constant``: older exporters keep weights in them) go
into every part that reads them and count as that part's parameters, so no
constant ever crosses a cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from edgeslim.api.split import CrossingTensor, SplitCut, SplitPart, SplitPlan, SplitSource
from edgeslim.compressor.shape_inference import infer_symbolic_shapes
from edgeslim.compressor.tensor_sizes import declared_bytes, element_bits
from edgeslim.errors import BadInput, OutputModelFailed

#: The largest part may exceed the best achievable largest part by this share,
#: to buy cuts with less traffic.
BALANCE_SLACK = 0.25
#: More tensors than this crossing one cut is not a cut point a person would pick.
MAX_CROSSING_TENSORS = 8
#: What one more tensor in a cut costs besides its bytes (its own field in every
#: request, a copy on each side): it makes single-tensor cuts win close calls.
TENSOR_OVERHEAD_BYTES = 1024


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's type as the parts declare it (symbolic dims kept) and its size at dims = 1."""

    elem_type: int
    shape: tuple[int | str, ...] | None
    bytes: int | None


@dataclass
class Analysis:
    """The model's nodes in order, with what every possible cut would cost."""

    model: onnx.ModelProto
    compute: list[onnx.NodeProto]
    """Nodes with inputs, in topological order: the cuts go between them."""
    sources: list[onnx.NodeProto]
    """Nodes that read only stored tensors (Constant, Identity of a weight), in order:
    copied into every part that reads them."""
    reads: list[set[str]]
    """Per compute node, every name it reads, subgraph captures included."""
    stored_bytes: dict[str, int]
    """Initializer or Constant output -> bytes it stores."""
    first_bytes: np.ndarray
    """Per compute node, the stored bytes it is the first to read (balance is on these)."""
    crossing: list[list[str]]
    """crossing[k]: tensors crossing a cut before compute node k (k = 1 .. len - 1)."""
    info: dict[str, TensorInfo]
    inputs: list[str]
    outputs: list[str]
    sizes: dict[str, int] = field(default_factory=dict)
    """Tensor -> bytes at dims = 1, where shape inference knows them."""
    live_order: dict[str, int] = field(default_factory=dict)
    """Tensor -> position it becomes available (-1 for graph inputs): orders part I/O."""

    def cut_bytes(self, k: int) -> int | None:
        sizes = [self.info[t].bytes if t in self.info else None for t in self.crossing[k]]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def cut_ok(self, k: int) -> bool:
        names = self.crossing[k]
        return (
            0 < len(names) <= MAX_CROSSING_TENSORS
            and self.cut_bytes(k) is not None
            and all(self.info[t].shape is not None for t in names)
        )

    def cut_cost(self, k: int) -> int:
        return (self.cut_bytes(k) or 0) + TENSOR_OVERHEAD_BYTES * (len(self.crossing[k]) - 1)


# ------------------------------------------------------------------ the graph


def _graph_captures(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    free: set[str] = set()
    for node in graph.node:
        free |= {n for n in _node_reads(node) if n not in defined}
        defined.update(o for o in node.output if o)
    free |= {o.name for o in graph.output if o.name not in defined}
    return free


def _node_reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names |= _graph_captures(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for sub in attr.graphs:
                names |= _graph_captures(sub)
    return names


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    return declared_bytes(list(tensor.dims), tensor.data_type) or 0


def _constant_bytes(node: onnx.NodeProto) -> int:
    total = 0
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            total += _stored_bytes(attr.t)
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            total += _stored_bytes(attr.sparse_tensor.values)
            total += _stored_bytes(attr.sparse_tensor.indices)
        elif attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
            total += 4 * len(attr.floats) + 8 * len(attr.ints)
    return total


def _type_map(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's inferred type. onnxruntime's symbolic inference first: it follows
    dims through Shape / Slice / Expand chains (a transformer's position ids, its
    mask), where onnx's own leaves them unknown; onnx's where the symbolic one gives up."""
    found: dict[str, onnx.TypeProto] = {}
    for infer in (_onnx_inference, _symbolic_inference):
        try:
            g = infer(model).graph
        except Exception:  # either may refuse a graph; the other one's answer stands
            continue
        for v in (*g.input, *g.value_info, *g.output):
            if _known(v.type) or v.name not in found:
                found[v.name] = v.type
    return found


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    inferred = infer_symbolic_shapes(model)  # in a child, with a deadline
    if inferred is None:
        raise RuntimeError("symbolic shape inference failed or ran past its deadline")
    return inferred


def _known(t: onnx.TypeProto) -> bool:
    """A tensor type with an element type and every dim a value or a named symbol."""
    if not t.HasField("tensor_type") or not t.tensor_type.elem_type:
        return False
    shape = t.tensor_type.shape if t.tensor_type.HasField("shape") else None
    return shape is not None and all(
        d.HasField("dim_value") or (d.dim_param and not d.dim_param.startswith("unk__"))
        for d in shape.dim
    )


def _dims_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs have every symbolic or unknown dim set to 1."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.type.HasField("tensor_type") and inp.type.tensor_type.HasField("shape"):
            for d in inp.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_value = 1
    return fixed


def _tensor_info(symbolic: onnx.TypeProto | None, ones: onnx.TypeProto | None) -> TensorInfo:
    """The type to declare (from the symbolic inference) and the bytes at dims = 1."""

    def tensor(t: onnx.TypeProto | None) -> onnx.TypeProto.Tensor | None:
        return t.tensor_type if t is not None and t.HasField("tensor_type") else None

    sym, one = tensor(symbolic), tensor(ones)
    elem = (sym.elem_type if sym is not None else 0) or (one.elem_type if one is not None else 0)
    shape: tuple[int | str, ...] | None = None
    if sym is not None and sym.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in sym.shape.dim
        )
    size = None
    if one is not None and one.HasField("shape") and elem and element_bits(elem):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in one.shape.dim]
        if all(d >= 0 for d in dims):
            size = declared_bytes(dims, elem)
    if shape is None and size is not None and one is not None:
        shape = tuple(d.dim_value for d in one.shape.dim)
    return TensorInfo(elem, shape, size)


def analyse(model: onnx.ModelProto) -> Analysis:
    """Every possible cut of `model` with the tensors that would cross it."""
    graph = model.graph
    inits = {t.name: _stored_bytes(t) for t in graph.initializer}
    for sparse in graph.sparse_initializer:
        inits[sparse.values.name] = _stored_bytes(sparse.values) + _stored_bytes(sparse.indices)
    inputs = [i.name for i in graph.input if i.name not in inits]
    outputs = [o.name for o in graph.output]
    compute: list[onnx.NodeProto] = []
    sources: list[onnx.NodeProto] = []
    reads: list[set[str]] = []
    stored = dict(inits)
    # Constant-derived tensors (a Constant's output, an Identity of a weight, a
    # Transpose of one) -> the stored tensors they come from: such nodes are
    # copied into each part that reads them, so a weight never crosses a cut.
    derived: dict[str, set[str]] = {name: {name} for name in inits}
    for node in graph.node:
        names = _node_reads(node)
        if names <= derived.keys():
            sources.append(node)
            origin = set().union(*(derived[n] for n in names)) if names else set()
            if not names:
                key = next((o for o in node.output if o), node.name)
                stored[key] = _constant_bytes(node)
                origin = {key}
            for out in node.output:
                if out:
                    derived[out] = origin
        else:
            compute.append(node)
            reads.append(names)
    first = _first_weights(reads, derived, stored)

    produced_at = {name: -1 for name in inputs}
    for i, node in enumerate(compute):
        for out in node.output:
            if out:
                produced_at[out] = i
    last_read: dict[str, int] = {}
    for i, names in enumerate(reads):
        for name in names:
            if name in produced_at:
                last_read[name] = i
    end = len(compute)
    for name in outputs:
        if name in produced_at:
            last_read[name] = end  # a final output travels on to the last part
    # crossing[k] = {t : produced before node k, read at node k or later}
    starts: dict[int, list[str]] = {}
    for name, at in produced_at.items():
        if name in last_read and last_read[name] > at:
            starts.setdefault(at + 1, []).append(name)
    crossing: list[list[str]] = [[] for _ in range(end)]
    live: dict[str, int] = {}
    for k in range(end):
        for name in starts.get(k, []):
            live[name] = produced_at[name]
        for name in [n for n in live if last_read[n] < k]:
            del live[name]
        crossing[k] = sorted(live, key=lambda n: (live[n], n))

    symbolic, ones = _type_map(model), _type_map(_dims_one(model))
    sizes = {n: b for n, t in ones.items() if (b := _tensor_info(None, t).bytes) is not None}
    info = {
        name: _tensor_info(symbolic.get(name), ones.get(name))
        for name in {n for names in crossing for n in names} | set(inputs) | set(outputs)
    }
    return Analysis(
        model=model,
        compute=compute,
        sources=sources,
        reads=reads,
        stored_bytes=stored,
        first_bytes=first,
        crossing=crossing,
        info=info,
        inputs=inputs,
        outputs=outputs,
        sizes=sizes,
        live_order=produced_at,
    )


# ------------------------------------------------------------------- choosing


def choose_cuts(an: Analysis, parts: int, max_part_bytes: int | None = None) -> list[int]:
    """The compute-node positions to cut before, `parts - 1` of them, ascending.

    Two passes of a dynamic programme over the cut points that qualify: the
    smallest largest part any choice allows, then the least traffic among the
    choices whose parts all stay within that (plus the slack) or the budget;
    ties go to the better balance.
    """
    n = len(an.compute)
    if parts < 1:
        raise BadInput(f"--parts {parts}: a model is split into 1 or more parts")
    if parts > n:
        raise BadInput(f"--parts {parts}: the model has only {n} nodes to split between")
    if parts == 1:
        if max_part_bytes is not None and int(an.first_bytes.sum()) > max_part_bytes:
            raise BadInput(
                f"the whole model holds {int(an.first_bytes.sum())} parameter bytes, over "
                f"--max-part-bytes {max_part_bytes}; ask for more --parts"
            )
        return []
    points = [k for k in range(1, n) if an.cut_ok(k)]
    if len(points) < parts - 1:
        raise BadInput(
            f"the model has {len(points)} places where at most {MAX_CROSSING_TENSORS} tensors "
            f"of known size cross, too few for {parts} parts"
        )
    # Prefix sums at each cut point, with the start (0) and the end (n) added.
    pos = np.array([0, *points, n])
    prefix = np.concatenate([[0], np.cumsum(an.first_bytes)])[pos].astype(np.float64)
    cost = np.array([0.0, *(float(an.cut_cost(k)) for k in points), 0.0])
    total = float(prefix[-1])
    best = _min_max_part(prefix, parts)
    cap = best * (1 + BALANCE_SLACK) if max_part_bytes is None else float(max_part_bytes)
    if best > cap:
        raise BadInput(
            f"no {parts} parts at the model's cut points each fit --max-part-bytes "
            f"{max_part_bytes}: the best split's largest part holds {int(best)} bytes"
        )
    # The smallest part as large as the cap allows (less the slack): no near-empty part
    # when one unsplittable layer sets the cap.
    floor = _max_min_part(prefix, parts, cap) * (1 - BALANCE_SLACK)
    target = total / parts
    chosen = _least_traffic(prefix, cost, parts, (floor, cap), target, total)
    return [int(pos[i]) for i in chosen]


def _min_max_part(prefix: np.ndarray, parts: int) -> float:
    """The smallest possible largest part over `parts` consecutive segments."""
    m = len(prefix)
    inf = np.inf
    f = np.full(m, inf)
    f[1:] = prefix[1:] - prefix[0]  # one part: from the start to point c
    f[0] = inf
    for _ in range(parts - 1):
        g = np.full(m, inf)
        for c in range(1, m):
            seg = prefix[c] - prefix[:c]
            g[c] = np.min(np.maximum(f[:c], seg))
        f = g
    return float(f[-1])


def _max_min_part(prefix: np.ndarray, parts: int, cap: float) -> float:
    """The largest possible smallest part when no part may exceed `cap`."""
    m = len(prefix)
    f = np.where(prefix - prefix[0] <= cap, prefix - prefix[0], -np.inf)
    f[0] = -np.inf
    for _ in range(parts - 1):
        g = np.full(m, -np.inf)
        for c in range(1, m):
            seg = prefix[c] - prefix[:c]
            g[c] = np.max(np.where(seg <= cap, np.minimum(f[:c], seg), -np.inf))
        f = g
    return max(float(f[-1]), 0.0)


def _least_traffic(
    prefix: np.ndarray,
    cost: np.ndarray,
    parts: int,
    bounds: tuple[float, float],
    target: float,
    total: float,
) -> list[int]:
    """Indices into the points (1 .. m-2) of the cheapest cuts whose parts all lie
    within `bounds`. The imbalance term is scaled below one byte: it only breaks ties."""
    m = len(prefix)
    inf = np.inf
    scale = 0.5 / (parts * max(total, 1.0))
    low, cap = bounds

    def part_cost(seg: np.ndarray) -> np.ndarray:
        fits = (seg <= cap) & (seg >= low)
        return np.where(fits, np.abs(seg - target) * scale, inf)

    f = np.full(m, inf)
    f[1:] = part_cost(prefix[1:] - prefix[0]) + cost[1:]
    back: list[np.ndarray] = []
    for _ in range(parts - 1):
        g = np.full(m, inf)
        arg = np.zeros(m, dtype=np.int64)
        for c in range(2, m):
            cand = f[1:c] + part_cost(prefix[c] - prefix[1:c])
            j = int(np.argmin(cand))
            g[c], arg[c] = cand[j] + cost[c], j + 1
        back.append(arg)
        f = g
    if not np.isfinite(f[-1]):
        raise BadInput(f"no {parts} parts at the model's cut points fit the part budget")
    chosen, c = [], m - 1
    for arg in reversed(back):
        c = int(arg[c])
        chosen.append(c)
    return sorted(chosen)


# ------------------------------------------------------------------ the parts


@dataclass
class SplitResult:
    parts: list[onnx.ModelProto]
    plan: SplitPlan


def _value_info(an: Analysis, name: str) -> onnx.ValueInfoProto:
    info = an.info.get(name)
    if info is None or not info.elem_type:
        raise BadInput(f"tensor {name!r} has no known type; the model cannot be cut around it")
    shape = None if info.shape is None else [d if d != "?" else None for d in info.shape]
    return helper.make_tensor_value_info(name, info.elem_type, shape)


def _crossing_tensor(an: Analysis, name: str) -> CrossingTensor:
    info = an.info[name]
    dtype = str(helper.tensor_dtype_to_np_dtype(info.elem_type))
    return CrossingTensor(
        name=name, dtype=dtype, shape=list(info.shape or ()), bytes=info.bytes or 0
    )


def _peak_bytes(an: Analysis, lo: int, hi: int, ins: list[str], outs: list[str]) -> int:
    """Largest sum of activations alive at once while nodes lo..hi-1 run (dims = 1)."""
    keep = set(outs)
    last: dict[str, int] = {}
    for i in range(lo, hi):
        for name in an.reads[i]:
            last[name] = i
    live = {n: an.sizes.get(n, 0) for n in ins}
    peak = sum(live.values())
    for i in range(lo, hi):
        for out in an.compute[i].output:
            if out:
                live[out] = an.sizes.get(out, 0)
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if n not in keep and last.get(n, -1) <= i]:
            del live[name]
    return peak


def _ordered(an: Analysis, names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (an.live_order.get(n, -1), n))


def build_part(an: Analysis, index: int, count: int, lo: int, hi: int) -> onnx.ModelProto:
    """Part `index` of `count`: compute nodes lo..hi-1 as a model of its own."""
    model, graph = an.model, an.model.graph
    first, last = index == 0, index == count - 1
    in_names = an.inputs if first else an.crossing[lo]
    out_names = an.outputs if last else an.crossing[hi]
    reads: set[str] = set().union(*an.reads[lo:hi]) if hi > lo else set()
    reads |= set(out_names)
    produced = {o for node in an.compute[lo:hi] for o in node.output if o}
    # The constant-derived nodes this part reads, and the ones they read in turn.
    picked: list[onnx.NodeProto] = []
    for node in reversed(an.sources):
        if any(o in reads and o not in produced for o in node.output if o):
            picked.append(node)
            reads |= _node_reads(node)
    nodes = [*reversed(picked), *an.compute[lo:hi]]
    inits = [t for t in graph.initializer if t.name in reads]
    sparse = [s for s in graph.sparse_initializer if s.values.name in reads]
    keep = reads | produced
    boundary = set(in_names) | set(out_names)
    value_info = [v for v in graph.value_info if v.name in keep and v.name not in boundary]
    part_graph = helper.make_graph(
        nodes,
        f"{graph.name or 'model'}_part{index}",
        [_value_info(an, n) for n in (in_names if first else _ordered(an, in_names))],
        [_value_info(an, n) for n in (out_names if last else _ordered(an, out_names))],
        initializer=inits,
        sparse_initializer=sparse,
        value_info=value_info,
    )
    if first:  # the client's request is the whole model's: declare its inputs as they were
        del part_graph.input[:]
        part_graph.input.extend(i for i in graph.input if i.name in set(an.inputs))
    if last:
        del part_graph.output[:]
        part_graph.output.extend(graph.output)
    if model.ir_version < 4:  # before IR 4, every initializer is a graph input too
        held = {t.name for t in inits} | {s.values.name for s in sparse}
        part_graph.input.extend(i for i in graph.input if i.name in held)
    part = helper.make_model(
        part_graph,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
    )
    part.functions.extend(model.functions)
    helper.set_model_props(
        part,
        {
            **{p.key: p.value for p in model.metadata_props},
            "edgeslim.split.part": f"{index}/{count}",
        },
    )
    return part


def _part_parameter_bytes(an: Analysis, part: onnx.ModelProto) -> int:
    total = sum(_stored_bytes(t) for t in part.graph.initializer)
    total += sum(
        _stored_bytes(s.values) + _stored_bytes(s.indices) for s in part.graph.sparse_initializer
    )
    return total + sum(_constant_bytes(n) for n in part.graph.node if not _node_reads(n))


def _first_weights(
    reads: list[set[str]], derived: dict[str, set[str]], stored: dict[str, int]
) -> np.ndarray:
    """Per compute node, the stored bytes it is the first to read, through derived tensors."""
    first = np.zeros(len(reads), dtype=np.int64)
    seen: set[str] = set()
    for i, names in enumerate(reads):
        weights = set().union(*(derived[n] for n in names if n in derived))
        for name in sorted(weights - seen):
            first[i] += stored[name]
            seen.add(name)
    return first


def split(
    model: onnx.ModelProto,
    parts: int,
    *,
    max_part_bytes: int | None = None,
    source_file: str = "model.onnx",
) -> SplitResult:
    """`model` cut into `parts` checked ONNX models and the plan that describes them."""
    an = analyse(model)
    cuts = choose_cuts(an, parts, max_part_bytes)
    bounds = [0, *cuts, len(an.compute)]
    models: list[onnx.ModelProto] = []
    records: list[SplitPart] = []
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        part = build_part(an, i, parts, lo, hi)
        try:
            onnx.checker.check_model(part, full_check=True)
        except Exception as exc:  # the source passed: our cut made it invalid
            raise OutputModelFailed(
                f"split: part {i} of {parts} fails the ONNX checker: {exc}"
            ) from exc
        data = part.SerializeToString()
        params = _part_parameter_bytes(an, part)
        ins, outs = [x.name for x in part.graph.input], [o.name for o in part.graph.output]
        models.append(part)
        records.append(
            SplitPart(
                index=i,
                file=f"part-{i}.onnx",
                sha256=hashlib.sha256(data).hexdigest(),
                inputs=ins,
                outputs=outs,
                nodes=len(part.graph.node),
                parameter_bytes=params,
                estimated_peak_bytes=params + _peak_bytes(an, lo, hi, ins, outs),
            )
        )
    plan_cuts = [
        SplitCut(
            after=i,
            tensors=[_crossing_tensor(an, n) for n in _ordered(an, an.crossing[k])],
            bytes=an.cut_bytes(k) or 0,
        )
        for i, k in enumerate(cuts)
    ]
    data = model.SerializeToString()
    plan = SplitPlan(
        source=SplitSource(
            file=source_file,
            sha256=hashlib.sha256(data).hexdigest(),
            nodes=len(model.graph.node),
            parameter_bytes=int(sum(an.stored_bytes.values())),
        ),
        max_part_bytes=max_part_bytes,
        parts=records,
        cuts=plan_cuts,
    )
    return SplitResult(models, plan)


# ------------------------------------------------------------------ running


def run_chain(sessions: list, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parts' onnxruntime sessions run one after another, as the servers do."""
    current = dict(feed)
    for sess in sessions:
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name: current[i.name] for i in sess.get_inputs()}
        current = dict(zip(names, sess.run(names, wanted), strict=True))
    return current


def max_abs_diff(whole: dict[str, np.ndarray], chained: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, expected in whole.items():
        got = chained[name]
        if got.shape != expected.shape:
            return float("inf")
        if expected.size and expected.dtype.kind in "fiub":
            diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
            worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
    return worst


#: Samples of a --check dataset the chain is compared on (a sanity check, not an evaluation).
CHECK_SAMPLES = 256
#: Largest |whole - chain| accepted: the parts run the same kernels on the same
#: values, so only fusions that change across a cut can move the last bits.
CHECK_TOLERANCE = 1e-4


def synthetic_feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One sample for every input (symbolic dims 1): normal floats, zero ids, true masks."""
    from edgeslim.compressor.datasets import model_inputs

    rng = np.random.default_rng(seed)
    feed = {}
    for spec in model_inputs(model):
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.normal(size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = np.ones(shape, spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, spec.dtype)
    return feed


def compare_chain(
    model: onnx.ModelProto, parts: list[onnx.ModelProto], feeds: Iterable[dict[str, np.ndarray]]
) -> tuple[float, int]:
    """(max |whole - chain| over every output and feed, samples compared)."""
    from edgeslim.compressor.evaluate import session

    whole = session(model)
    chain = [session(p) for p in parts]
    names = [o.name for o in whole.get_outputs()]
    worst, samples = 0.0, 0
    for feed in feeds:
        expected = dict(zip(names, whole.run(names, feed), strict=True))
        worst = max(worst, max_abs_diff(expected, run_chain(chain, feed)))
        samples += len(next(iter(feed.values()))) if feed else 1
    return worst, samples
