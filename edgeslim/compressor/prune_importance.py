"""Structured pruning, part 2: how important each unit is, and which units go.

A unit's importance is aggregated over every member of its group:

* l1 / l2: group magnitude, as Torch-Pruning's GroupMagnitudeImportance: the
  norm of the unit's slice in every member (the output rows of every layer that
  writes it: all producers of a residual stream, Q, K and V of a head, a
  depthwise filter; the input columns of every layer that reads it; BatchNorm
  and LayerNorm scales), each member's norms divided by their mean, averaged
  over the members. A channel whose producing weights are all zero scores 0.
* activation: Wanda-style |W| * ||X||: for every layer that reads the unit,
  the absolute input weights of the unit times the L2 norm of the input
  activation on calibration data, summed. A channel that is always zero on
  the calibration data scores 0 whatever its weights.
* taylor: first-order |w * dL/dw| over every member slice (outputs, inputs,
  biases), accumulated over calibration batches run through the torch bridge.
* fpgm: redundancy rather than size: the mean distance of the unit's direction
  (each member's slice scaled to unit length) to the other units' in its group;
  the units nearest the group's geometric median go first (`fpgm_scores`).

`layer` scope removes the same share of units in every group; `global` scope
ranks all units against each other after dividing each group's scores by its
mean (groups differ in scale), keeping `min_channels` units in every group.
With `round_to`, each group then gives back its most important removed units
until the channels it keeps are a multiple of it (or all of them).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx

from edgeslim.api.spec import Criterion, PruneConfig, PruneScope
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.prune_graph import attr, unoptimized_session
from edgeslim.compressor.prune_groups import Group, Groups, Member, label


def _slice_sums(w: np.ndarray, axis: int, square: bool) -> np.ndarray:
    """Sum of |w| (or w^2) of each slice of `w` along `axis`."""
    flat = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    return (flat**2).sum(1) if square else np.abs(flat).sum(1)


_SCALES = ("BatchNormalization", "InstanceNormalization", "LayerNormalization")


def _magnitude_members(groups: Groups) -> list[Member]:
    """The members whose slice of a unit counts for l1 / l2: every layer's output
    rows ("out", depthwise filters included), every layer's input columns ("in":
    Conv input channels, Gemm / MatMul input rows) and normalisation scales."""
    return [
        mem
        for mem in groups.d.members.values()
        if mem.role in ("out", "in")
        or (mem.role == "param" and mem.index == 1 and mem.node.op_type in _SCALES)
    ]


def weight_scores(groups: Groups, l2: bool) -> dict[int, float]:
    """unit -> group magnitude: the mean over the group's members of the unit's slice
    norm, each member's norms divided by that member's mean first.

    Like Torch-Pruning's GroupMagnitudeImportance, the slices are the producers'
    output rows, the consumers' input columns and BatchNorm / LayerNorm scales. Each
    member is normalised on its own so that no single layer (a wide consumer, a
    BN-folded producer) dominates the group's ranking. A unit whose output slices
    are all zero writes nothing and scores 0.
    """
    m = groups.d.m
    acc: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    written: dict[int, float] = defaultdict(float)
    for mem in _magnitude_members(groups):
        sums = _slice_sums(m.array(mem.node.input[mem.index]), mem.axis, l2)
        units = groups.roots[mem.ids]
        keys, inverse = np.unique(units, return_inverse=True)
        per_unit = np.zeros(len(keys))
        np.add.at(per_unit, inverse, sums)  # a head's channels add up to one unit
        if l2:
            per_unit = np.sqrt(per_unit)
        if mem.role == "out":
            for unit, v in zip(keys.tolist(), per_unit.tolist(), strict=True):
                written[unit] += v
        mean = float(per_unit.mean())
        if mean > 0:
            per_unit = per_unit / mean
        for unit, v in zip(keys.tolist(), per_unit.tolist(), strict=True):
            acc[unit] += v
            count[unit] += 1
    return {u: 0.0 if written.get(u, 1.0) == 0 else acc[u] / count[u] for u in acc}


def output_norms(groups: Groups, l2: bool) -> dict[int, float]:
    """unit -> l1 or l2 norm over all its output slices (no normalisation)."""
    acc: dict[int, float] = defaultdict(float)
    m = groups.d.m
    for mem in groups.d.members.values():
        if mem.role != "out":
            continue
        sums = _slice_sums(m.array(mem.node.input[mem.index]), mem.axis, l2)
        for unit, v in zip(groups.roots[mem.ids].tolist(), sums.tolist(), strict=True):
            acc[unit] += v
    return {u: math.sqrt(v) if l2 else v for u, v in acc.items()}


def _input_axis(mem: Member) -> int:
    """Axis of the layer's data input that lines up with the sliced weight axis."""
    node = mem.node
    if node.op_type in ("Conv", "ConvTranspose"):
        return 1
    if (
        node.op_type == "Gemm"
        and node.attribute
        and any(a.name == "transA" and a.i for a in node.attribute)
    ):
        return 0
    return -1


def channel_moments(
    model: onnx.ModelProto, members: list[Member], data: Dataset, batch: int = 8
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean and L2 norm of each channel of every layer input that `members` read, over
    `data` (one pass, every input at once)."""
    wanted: dict[str, int] = {}
    for mem in members:
        wanted[mem.node.input[0]] = _input_axis(mem)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    present = {o.name for o in work.graph.output}
    for name in wanted:
        if name not in present:
            work.graph.output.append(onnx.ValueInfoProto(name=name))
    session = unoptimized_session(work)
    names = list(wanted)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for start in range(0, len(data), batch):
        values = session.run(names, data.batch(start, start + batch))
        for name, value in zip(names, values, strict=True):
            arr = np.moveaxis(np.asarray(value, dtype=np.float64), wanted[name], 0)
            flat = arr.reshape(arr.shape[0], -1)
            sums[name] = sums.get(name, 0) + flat.sum(1)
            squares[name] = squares.get(name, 0) + (flat**2).sum(1)
            counts[name] = counts.get(name, 0) + flat.shape[1]
    means = {name: v / max(counts[name], 1) for name, v in sums.items()}
    return means, {name: np.sqrt(v) for name, v in squares.items()}


class Calibration:
    """Calibration data for one model's groups, with the channel moments that both
    the activation criterion and bias compensation read: measured on first use for
    every layer input at once, so one onnxruntime pass serves both."""

    def __init__(self, groups: Groups, data: Dataset) -> None:
        self.groups = groups
        self.data = data
        self._moments: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(mean, L2 norm) of each channel, by the layer input tensor's name."""
        if self._moments is None:
            readers = [mem for mem in self.groups.d.members.values() if mem.role == "in"]
            self._moments = channel_moments(self.groups.d.m.model, readers, self.data)
        return self._moments


def activation_scores(groups: Groups, calibration: Calibration) -> dict[int, float]:
    """unit -> sum over the layers reading it of |W_in slice| * ||X channel||."""
    m = groups.d.m
    readers = [mem for mem in groups.d.members.values() if mem.role == "in"]
    _, norms = calibration.moments()
    acc: dict[int, float] = defaultdict(float)
    for mem in readers:
        sums = _slice_sums(m.array(mem.node.input[mem.index]), mem.axis, square=False)
        x = norms[mem.node.input[0]]
        if x.shape != sums.shape:
            raise RuntimeError(f"activation of {label(mem.node)} does not match its weight")
        for unit, v in zip(groups.roots[mem.ids].tolist(), (sums * x).tolist(), strict=True):
            acc[unit] += v
    # Units no weight layer reads (rare) fall back to their weight norm.
    fallback = output_norms(groups, l2=True)
    return {u: acc.get(u, fallback.get(u, 0.0)) for u in set(acc) | set(fallback)}


def taylor_scores(groups: Groups, data: Dataset, batch: int = 16) -> dict[int, float]:
    """unit -> sum over every member slice of |w * dL/dw|, accumulated over batches.

    The graph runs through the torch bridge. L is cross-entropy against the
    dataset's labels, or against the model's own predictions when there are
    none (or the output is not [N, classes]); any other output uses its mean
    square. A channel that is never active scores 0: the weights that read it
    see a zero input, the ones that write it sit behind a ReLU that passes no
    gradient.
    """
    import torch

    from edgeslim.compressor.torchgraph import OnnxModule

    m = groups.d.m
    module = OnnxModule(m.model)
    weights = module.weights()
    members = [mem for mem in groups.d.members.values() if mem.node.input[mem.index] in weights]
    sums = {id(mem): np.zeros(len(mem.ids)) for mem in members}
    for start in range(0, len(data), batch):
        feeds = data.batch(start, start + batch)
        out = module(*[torch.from_numpy(np.asarray(feeds[n])) for n in module.input_names])[0]
        labels = None if data.labels is None else data.labels[start : start + batch]
        module.zero_grad()
        _taylor_loss(out, labels).backward()
        for mem in members:
            w = weights[mem.node.input[mem.index]]
            if w.grad is None:
                continue
            sums[id(mem)] += _slice_sums((w.detach() * w.grad).numpy(), mem.axis, square=False)
    acc: dict[int, float] = defaultdict(float)
    for mem in members:
        for unit, v in zip(groups.roots[mem.ids].tolist(), sums[id(mem)].tolist(), strict=True):
            acc[unit] += v
    return {u: acc.get(u, 0.0) for u in {int(r) for r in groups.roots}}


def _taylor_loss(out, labels: np.ndarray | None):
    import torch

    out = out.float()
    if out.ndim == 2 and out.shape[1] > 1:
        target = out.argmax(1).detach()
        if labels is not None and np.issubdtype(labels.dtype, np.integer):
            given = torch.from_numpy(labels.astype(np.int64).reshape(-1))
            if given.shape == target.shape and int(given.max()) < out.shape[1]:
                target = given
        return torch.nn.functional.cross_entropy(out, target)
    return out.pow(2).mean()


def scores(
    groups: Groups, config: PruneConfig, calibration: Calibration | None
) -> dict[int, float]:
    if config.criterion in (Criterion.activation, Criterion.taylor):
        if calibration is None:
            raise ValueError(f"{config.criterion.value} importance needs calibration data")
        if config.criterion is Criterion.taylor:
            return taylor_scores(groups, calibration.data)
        return activation_scores(groups, calibration)
    if config.criterion is Criterion.fpgm:
        return fpgm_scores(groups)
    return weight_scores(groups, l2=config.criterion is Criterion.l2)


def select(groups: Groups, config: PruneConfig, score: dict[int, float]) -> dict[int, list[int]]:
    """group root -> the units to remove, lowest importance first (ties: lower channel)."""
    floor = max(1, config.min_channels)
    # Pinned units (a gate that scales the other channels) stay; the share is of the rest.
    ordered = {
        grp.root: sorted(grp.free_units, key=lambda u: (score.get(u, 0.0), u))
        for grp in groups.prunable
    }
    if config.scope is PruneScope.layer:
        out = {}
        for grp in groups.prunable:
            free = ordered[grp.root]
            n = min(math.floor(config.sparsity * len(free) + 0.5), len(free) - floor)
            if n > 0:
                out[grp.root] = free[:n]
    else:
        out = _select_global(groups.prunable, ordered, score, config.sparsity, floor)
    if config.round_to and config.round_to > 1:
        by_root = {grp.root: grp for grp in groups.prunable}
        out = {
            root: units[: rounded_removal(by_root[root], len(units), config.round_to)]
            for root, units in out.items()
        }
    return {root: units for root, units in out.items() if units}


def rounded_removal(grp: Group, n: int, round_to: int) -> int:
    """How many of `n` chosen units may go so that the channels left (units times the
    channels of a unit: a head's width) are a multiple of `round_to`, rounding the kept
    count up; all units stay when no smaller multiple fits."""
    kept = len(grp.units) - n
    while kept < len(grp.units) and (kept * grp.unit_width) % round_to:
        kept += 1
    return len(grp.units) - kept


def _select_global(
    prunable: list[Group],
    ordered: dict[int, list[int]],
    score: dict[int, float],
    sparsity: float,
    floor: int,
) -> dict[int, list[int]]:
    pool = []
    for grp in prunable:
        mean = float(np.mean([score.get(u, 0.0) for u in grp.units])) or 1.0
        pool += [(score.get(u, 0.0) / mean, u, grp) for u in ordered[grp.root]]
    pool.sort(key=lambda item: (item[0], item[1]))
    budget = math.floor(sparsity * len(pool) + 0.5)
    taken: dict[int, list[int]] = defaultdict(list)
    for _, unit, grp in pool:
        if budget <= 0:
            break
        if len(ordered[grp.root]) - len(taken[grp.root]) > floor:  # pinned ones aside
            taken[grp.root].append(unit)
            budget -= 1
    return {k: v for k, v in taken.items() if v}


# Units each unit is compared with at most: a wider group is compared with an evenly
# spaced sample of itself, whose mean distance ranks units close to how the full mean
# would, at n x 1024 work instead of n x n.
FPGM_REFERENCES = 1024


def _unit_rows(flat: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids, one row per unit: its channels' slices side by side, in channel order)."""
    keys, inverse = np.unique(units, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    if (counts == counts[0]).all():
        return keys, flat[order].reshape(len(keys), -1)
    width = int(counts.max()) * flat.shape[1]  # uneven units: padded with zeros
    rows = np.zeros((len(keys), width))
    for k in range(len(keys)):
        part = flat[inverse == k].reshape(-1)
        rows[k, : len(part)] = part
    return keys, rows


def fpgm_scores(groups: Groups) -> dict[int, float]:
    """unit -> mean distance of the unit's direction to the other units' in its group.

    FPGM (He et al., 2019) removes the filters nearest the group's geometric median:
    the ones the others can best stand in for. Here every member's slice of a unit
    (producers' rows, consumers' columns) is first scaled to unit length, so only
    directions are compared. An exporter folds each BatchNorm into the conv before
    it, multiplying every row by its channel's gamma / std: the rows' norms then
    mostly measure the pre-norm spread, which the norm had cancelled, and rank the
    channels worse than chance after distillation (measured in the README); their
    directions are what training left. Two units' squared distance is the mean over
    the members holding both (a Slice or Split consumer holds a part of the group).
    A unit whose output rows are all zero writes nothing and scores 0.

    Groups with a depthwise or grouped conv keep the group magnitude (l1): there
    each channel's filter reads its own input, so a filter like the others is not one
    they can stand in for. Measured on mobilenet_v3_small pruned to 0.7 (10 epochs
    of distillation, seeds 0-2): 95.9 with fpgm everywhere, 95.9 with the depthwise
    filters left out of the distances, 97.1 with l1 in those groups (l1 everywhere:
    97.1)."""
    m = groups.d.m
    grouped = {
        int(root)
        for mem in groups.d.members.values()
        if mem.node.op_type == "Conv" and attr(mem.node, "group", 1) != 1
        for root in np.unique(groups.group_of[mem.ids])
    }
    magnitude = weight_scores(groups, l2=False) if grouped else {}
    of_group = {
        u: grp.root for grp in groups.prunable if grp.root not in grouped for u in grp.units
    }
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    written: dict[int, float] = defaultdict(float)
    ranked = set(of_group.values())
    for mem in groups.d.members.values():
        if mem.role not in ("out", "in"):
            continue
        if ranked.isdisjoint(np.unique(groups.group_of[mem.ids]).tolist()):
            continue  # no unit of a group ranked here (written only matters there too)
        w = m.array(mem.node.input[mem.index]).astype(np.float64)
        flat = np.moveaxis(w, mem.axis, 0).reshape(w.shape[mem.axis], -1)
        keys, rows = _unit_rows(flat, groups.roots[mem.ids])
        norms = np.linalg.norm(rows, axis=1)
        if mem.role == "out":
            for unit, v in zip(keys.tolist(), norms.tolist(), strict=True):
                written[unit] += v
        rows = rows / np.where(norms > 0, norms, 1.0)[:, None]
        roots = np.array([of_group.get(u, -1) for u in keys.tolist()])
        for root in np.unique(roots[roots >= 0]).tolist():
            mine = roots == root
            parts[root].append((keys[mine], rows[mine]))
    out: dict[int, float] = {}
    for grp in groups.prunable:
        if grp.root in grouped:
            out.update({u: magnitude.get(u, 0.0) for u in grp.units})
            continue
        pos = {u: i for i, u in enumerate(grp.units)}
        n = len(grp.units)
        refs = np.unique(np.linspace(0, n - 1, min(n, FPGM_REFERENCES)).astype(int))
        col = np.full(n, -1)
        col[refs] = np.arange(len(refs))
        square = np.zeros((n, len(refs)))
        shared = np.zeros((n, len(refs)))
        for keys, rows in parts[grp.root]:
            at = np.array([pos[u] for u in keys.tolist()])
            held = col[at] >= 0
            length = (rows * rows).sum(1)  # 1, or 0 for an all-zero slice
            gram = rows @ rows[held].T
            dist = length[:, None] + length[held][None, :] - 2 * gram
            square[np.ix_(at, col[at[held]])] += np.maximum(dist, 0)
            shared[np.ix_(at, col[at[held]])] += 1
        shared[refs, np.arange(len(refs))] = 0  # not a unit's distance to itself
        both = shared > 0
        dist = np.sqrt(np.where(both, square, 0) / np.maximum(shared, 1))
        mean = dist.sum(1) / np.maximum(both.sum(1), 1)
        for u, v in zip(grp.units, mean.tolist(), strict=True):
            out[u] = 0.0 if written.get(u, 1.0) == 0 else v
    return out
