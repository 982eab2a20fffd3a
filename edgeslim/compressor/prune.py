"""The prune step: zero single weights (magnitude) or remove whole channels (structured).

Works on the ONNX graph directly, so it needs neither torch nor the model's
source code. Magnitude pruning keeps every shape and only makes weights zero
(the file compresses better, latency is unchanged); structured pruning makes
layers narrower: `prune_groups` finds the channels that must go together,
`prune_importance` ranks them and `prune_apply` cuts them out.

Weights inside If/Loop/Scan bodies are never touched, only reported: their
consumers live in another scope, which this step does not trace.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.api.spec import Criterion, PruneConfig, PruneMethod, PruneScope
from edgeslim.compressor import channel_map
from edgeslim.compressor import graph as g
from edgeslim.compressor import prune_apply as pa
from edgeslim.compressor import prune_compensate as pc
from edgeslim.compressor import prune_graph as pgr
from edgeslim.compressor import prune_groups as pg
from edgeslim.compressor import prune_importance as pi
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.prune_layout import SHAPE_READ
from edgeslim.compressor.steps import StepContext, StepOutput
from edgeslim.errors import BadInput

# Activations that are not positively homogeneous (f(a x) != a f(x) for a > 0, unlike
# ReLU): what they compute depends on their input's scale, not only on its direction.
# Opset 11-13 exports spell hard-swish as x * HardSigmoid(x) and SiLU as x * Sigmoid(x),
# so the gate alone is enough to recognise them.
SCALE_SENSITIVE = frozenset(
    {"HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu"}
    | {"Softplus", "Softsign", "Mish", "Erf"}
)

MAGNITUDE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Below this a weight is a bias-like vector or a toy kernel: pruning it saves
# nothing and can wreck a layer.
MIN_PRUNABLE = 16


class Prune:
    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    def run(self, model: onnx.ModelProto, ctx: StepContext | None = None) -> StepOutput:
        """Prune a copy of `model`; `ctx` is only read for calibration data (criterion
        activation or taylor), so None does for the others."""
        excluded = set(self.config.exclude_nodes)
        check_excludes(model, excluded)

        work = onnx.ModelProto()
        work.CopyFrom(model)
        notes: list[str] = []
        converted = g.constants_to_initializers(work)
        if converted:
            notes.append(f"{converted} Constant nodes turned into initializers")
        in_subgraphs = g.subgraph_weight_count(work)
        if in_subgraphs:
            notes.append(
                f"{in_subgraphs:,} weight elements inside If/Loop/Scan bodies were not pruned"
            )

        if self.config.method is PruneMethod.magnitude:
            changed = prune_magnitude(work, self.config, excluded, notes)
        else:
            calibration = self.calibration(model, ctx, notes)
            work = fold_shapes_if_it_helps(work, excluded, notes)
            changed = prune_structured(work, self.config, excluded, notes, calibration)
        if not changed:
            return StepOutput(model=model, notes=notes)

        g.strip_value_info(work)  # intermediate shapes are stale after structured pruning
        validate(work, model)
        return StepOutput(model=work, notes=notes)

    def calibration(
        self, model: onnx.ModelProto, ctx: StepContext | None, notes: list[str]
    ) -> Dataset | None:
        """Calibration samples: for activation or taylor importance, and for the bias
        shift (None where there is no context: then weight criteria go without it)."""
        criterion = self.config.criterion
        calibrated = criterion in (Criterion.activation, Criterion.taylor)
        if ctx is None:
            if calibrated:
                raise BadInput(f"prune.criterion {criterion.value} needs calibration data")
            return None
        if not calibrated and self.config.compensate_bias is False:
            return None
        uri = (
            self.config.calibration_dataset or (ctx.train_datasets or [ctx.evaluation_dataset])[-1]
        )
        if not uri and not calibrated:
            return None  # no data in sight: channels are cut bare
        data = ctx.load_dataset(uri, None, model).head(self.config.calibration_samples)
        use = f"{criterion.value} importance" if calibrated else "channel means"
        notes.append(f"{use} from {len(data)} samples of {uri}")
        return data


def check_excludes(model: onnx.ModelProto, excluded: set[str]) -> None:
    """A misspelt exclude would silently prune the layer it meant to protect."""
    names = {node.name for graph in g.iter_graphs(model.graph) for node in graph.node}
    unknown = sorted(excluded - names)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise BadInput(f"prune.excludeNodes: no node named {', '.join(hints)} in the model")


def validate(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The pruned model must pass the full checker, unless the source never did."""
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as err:
        try:
            onnx.checker.check_model(original, full_check=True)
        except Exception:
            return  # not ours to judge: the source fails the same checks
        raise RuntimeError(f"prune produced an invalid model: {err}") from err


# ---------------------------------------------------------------------------
# Magnitude (unstructured) pruning


@dataclass
class Target:
    """One weight initializer and the nodes that read it as their weight."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)


def weight_input(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The name of the node's weight initializer (never its bias), if any."""
    if node.op_type not in MAGNITUDE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        # Either side may be the constant; a 1-D operand is a vector, not a weight.
        for name in reversed(node.input[:2]):
            if name in inits and len(inits[name].dims) >= 2:
                return name
        return None
    name = node.input[1] if len(node.input) > 1 else ""
    return name if name in inits else None


def magnitude_targets(graph: onnx.GraphProto, excluded: set[str], notes: list[str]) -> list[Target]:
    """Prunable weights of the main graph, each once even when shared."""
    inits = g.initializer_map(graph)
    found: dict[str, Target] = {}
    for node in graph.node:
        name = weight_input(node, inits)
        if name:
            found.setdefault(name, Target(name)).nodes.append(node)

    targets, tiny, skipped_excluded, not_float = [], [], 0, 0
    for t in found.values():
        init = inits[t.name]
        if any(n.name in excluded for n in t.nodes):
            skipped_excluded += 1  # shared with an excluded node: the exclusion wins
        elif init.data_type not in pgr.FLOAT_TYPES:
            not_float += 1
        elif int(np.prod(init.dims)) < MIN_PRUNABLE:
            tiny.append(pgr.label(t.nodes[0]))
        else:
            targets.append(t)
    if skipped_excluded:
        notes.append(f"{skipped_excluded} excluded weights left as they were")
    if not_float:
        notes.append(f"{not_float} non-float (already quantized?) weights left as they were")
    if tiny:
        notes.append(
            f"{len(tiny)} weights under {MIN_PRUNABLE} elements not pruned: {', '.join(tiny[:5])}"
            + (" ..." if len(tiny) > 5 else "")
        )
    return targets


def smallest(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of exactly the k smallest entries (ties broken arbitrarily)."""
    mask = np.zeros(magnitudes.size, dtype=bool)
    if k >= magnitudes.size:
        mask[:] = True
    elif k > 0:
        mask[np.argpartition(magnitudes, k - 1)[:k]] = True
    return mask


def prune_magnitude(
    model: onnx.ModelProto, config: PruneConfig, excluded: set[str], notes: list[str]
) -> bool:
    """Zero the smallest weights; True when any weight changed.

    l1 ranks by |w| and l2 by w^2: the same order for single weights, so both
    use |w|. Exactly round(sparsity * n) weights end up in the zeroed set
    (weights that were already zero count towards it).
    """
    graph = model.graph
    targets = magnitude_targets(graph, excluded, notes)
    if not targets:
        notes.append("magnitude: no Conv/Gemm/MatMul weight to prune")
        return False
    arrays = [numpy_helper.to_array(g.initializer_map(graph)[t.name]) for t in targets]
    mags = [np.abs(a).astype(np.float32).reshape(-1) for a in arrays]

    if config.scope is PruneScope.global_:
        total = sum(m.size for m in mags)
        mask = smallest(np.concatenate(mags), round(config.sparsity * total))
        masks = np.split(mask, np.cumsum([m.size for m in mags])[:-1])
    else:
        masks = [smallest(m, round(config.sparsity * m.size)) for m in mags]

    zeros_before = sum(a.size - np.count_nonzero(a) for a in arrays)
    pruned = []
    for t, arr, mask in zip(targets, arrays, masks, strict=True):
        new = np.where(mask.reshape(arr.shape), np.zeros((), arr.dtype), arr)
        g.replace_initializer(graph, t.name, new)
        pruned.append(new)
    total = sum(a.size for a in pruned)
    zeros = sum(a.size - np.count_nonzero(a) for a in pruned)
    scope = "global" if config.scope is PruneScope.global_ else "layer"
    if zeros == zeros_before:
        notes.append(
            f"magnitude: nothing to zero at sparsity {config.sparsity:.1%} "
            f"({zeros / total:.1%} of {total:,} weights already zero)"
        )
        return False
    notes.append(
        f"magnitude: {zeros / total:.1%} of {total:,} weights zeroed ({scope} scope, "
        f"{len(targets)} layers)"
    )
    if config.scope is PruneScope.global_:
        per_layer = [
            f"{pgr.label(t.nodes[0])} {1 - np.count_nonzero(a) / a.size:.1%}"
            for t, a in zip(targets, pruned, strict=True)
        ]
        notes.append("per layer: " + ", ".join(per_layer[:20]) + (" ..." * (len(per_layer) > 20)))
    return True


# ---------------------------------------------------------------------------
# Structured pruning (groups in prune_groups, importance in prune_importance,
# surgery in prune_apply)


@dataclass
class StructuredPlan:
    """What structured pruning will do to a model, before it does it."""

    groups: pg.Groups
    chosen: dict[int, list[int]]
    """group root -> units to remove."""
    surgery: pa.Surgery
    before: int
    predicted: int
    """weight_stats' parameter count once the plan is applied."""
    calibration: pi.Calibration | None = None
    """The calibration data and, once measured, its channel moments (shared with
    bias compensation)."""


def plan_structured(
    model: onnx.ModelProto,
    config: PruneConfig,
    excluded: set[str],
    notes: list[str],
    calibration: Dataset | None = None,
) -> StructuredPlan | None:
    """Find the groups of `model` (initializer weights) and choose what goes; None if nothing.

    `model` may gain initializers (shared constants unshared, explicit Split
    sizes) and have its channel shuffles written as Gathers, but computes the
    same function; no channel is removed yet.
    """
    if config.sparsity == 0:
        notes.append("structured: sparsity 0 removes no channel; model unchanged")
        return None
    _prepare(model, notes)
    before, _ = g.weight_stats(model)
    groups = pg.discover(model, excluded)
    for grp in groups.groups:
        if grp.blocked == "excluded":
            notes.append(f"kept {grp.label}: excluded")
        elif grp.blocked is not None:
            notes.append(f"skipped {grp.label}: {grp.blocked}")
    if not groups.prunable:
        if not groups.d.layers:
            notes.append("structured: no Conv/Gemm/MatMul layer with a constant weight")
        notes.append("structured: no layer could be pruned; model unchanged")
        return None
    calib = None if calibration is None else pi.Calibration(groups, calibration)
    chosen = pi.select(groups, config, pi.scores(groups, config, calib))
    if not chosen:
        notes.append(f"structured: sparsity {config.sparsity:.1%} removes no channel")
        notes.append("structured: no layer could be pruned; model unchanged")
        return None
    surgery = pa.Surgery(groups, {u for units in chosen.values() for u in units})
    return StructuredPlan(
        groups, chosen, surgery, before, surgery.predicted_parameters(before), calib
    )


# The rewrites discovery needs, in this order, each with the note it leaves when it
# changed anything (the count fills in {}).
REWRITES: list[tuple[Callable[[onnx.ModelProto], int], str]] = [
    (
        pgr.identities_to_initializers,
        "{} Identity nodes of shared constants turned into initializers",
    ),
    (g.merge_duplicate_initializers, "{} initializers equal to another merged into it (shared)"),
    (
        pgr.identity_gathers_to_reshapes,
        "{} Gathers that pick every element in order written as Reshapes",
    ),
    (pgr.drop_needless_allowzero, "allowzero cleared on {} Reshapes whose target has no 0"),
    (pgr.fold_integer_constants, "{} nodes computing integer constants (shapes, pads) folded"),
    (pgr.fold_constant_layouts, "{} Reshape / Transpose nodes over constant weights folded"),
]


def _prepare(model: onnx.ModelProto, notes: list[str]) -> None:
    """The rewrites discovery needs, none of which changes what the model computes."""
    for rewrite, note in REWRITES:
        count = rewrite(model)
        if count:
            notes.append(note.format(count))
    shuffles = pgr.shuffles_to_gathers(model)
    if shuffles:
        notes.append(
            f"{len(shuffles)} channel shuffles (Reshape, Transpose, Reshape) written as a "
            f"Gather of their channels, so that any channels can go: {', '.join(shuffles[:3])}"
            + (f" (+{len(shuffles) - 3} more)" if len(shuffles) > 3 else "")
        )


def _reach(model: onnx.ModelProto, excluded: set[str]) -> tuple[int, bool]:
    """Layer inputs and outputs a prunable group slices (in a copy of `model`), and
    whether a Shape that reads a channel count kept any group whole. Sides, not
    layers: a Llama's query projection is reached through the hidden width either
    way, but only the slimmed graph also cuts its heads."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _prepare(work, [])
    groups = pg.discover(work, excluded)
    by_shape = any(
        grp.blocked is not None and grp.blocked.startswith(COMPUTED_SHAPE_BLOCKS)
        for grp in groups.groups
    )
    return len(groups.reached_sides()), by_shape


# Why a group stays whole where sizes computed at run time may be to blame: a Shape
# reads its channel count, or a Reshape's target holds computed entries the rules
# cannot see through (nn.MultiheadAttention's TorchScript export reads E from its
# input to unflatten the packed projection).
COMPUTED_SHAPE_BLOCKS = (
    SHAPE_READ,
    "Reshape ",
)


def fold_shapes_if_it_helps(
    model: onnx.ModelProto, excluded: set[str], notes: list[str]
) -> onnx.ModelProto:
    """`model` after onnxslim (what the simplify step runs) where a Shape reading a
    channel count keeps a group whole and the slimmed graph slices more of the layers.

    Exporters compute Reshape targets and Slice bounds from `Shape` at run time
    (ShuffleNet's shuffle, nn.MultiheadAttention's head split); over fixed dims
    onnxslim folds them into constants the groups can follow. Otherwise, or if an
    excluded node would lose its name, `model` as it is."""
    if not any(n.op_type == "Shape" for n in model.graph.node):
        return model  # nothing reads a shape: spare the trial discovery
    reached, by_shape = _reach(model, excluded)
    if not by_shape:
        return model
    try:
        from edgeslim.compressor.simplify import slim as simplified

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        slim = simplified(copy)
        g.constants_to_initializers(slim)
    except Exception:  # a graph onnxslim cannot handle: prune what can be followed
        return model
    if not excluded <= {n.name for n in slim.graph.node}:
        return model
    more, _ = _reach(slim, excluded)
    if more <= reached:
        return model
    notes.append(
        f"simplified first (onnxslim, as the simplify step): shapes computed from fixed dims "
        f"became constants, so groups slice {more} layer inputs and outputs instead of {reached}"
    )
    return slim


def prune_structured(
    model: onnx.ModelProto,
    config: PruneConfig,
    excluded: set[str],
    notes: list[str],
    calibration: Dataset | None = None,
) -> bool:
    """Remove the least important units of every dependency group; True when any went."""
    plan = plan_structured(model, config, excluded, notes, calibration)
    if plan is None:
        return False
    layers = plan.groups.d.layers
    layer_ids = {id(n) for n in layers}
    pruned_layers = {
        id(node) for node, index, _ in plan.surgery.edits.values() if index == 1
    } & layer_ids
    shifts = []
    if plan.calibration is not None and config.compensate_bias is not False:
        shifts = pc.plan_shifts(plan.groups, plan.surgery.gone, plan.calibration)
    kept, unmatched = _conv_channels(plan)
    plan.surgery.apply()
    channel_map.record(model, kept, unmatched)
    for grp in plan.groups.prunable:
        if grp.pinned:
            notes.append(f"kept {len(grp.pinned)} {grp.unit_name} of {grp.label}: {grp.pinned_by}")
        if grp.root in plan.chosen:
            n = len(plan.chosen[grp.root])
            notes.append(f"removed {n}/{len(grp.units)} {grp.unit_name} of {grp.label}")
            if grp.normalized:
                notes.append(
                    f"{grp.normalized} normalizes over the channels of {grp.label}: its "
                    "statistics now cover the kept ones only, so the outputs are not those "
                    "of the source even where removed channels were zero (distill to recover)"
                )
            if grp.maximum:
                notes.append(
                    f"{grp.maximum} takes the maximum over the channels of {grp.label}: it "
                    "now covers the kept ones only, the source's wherever the kept maximum "
                    "is at least what was removed (always, after a ReLU, where removed "
                    "channels were zero)"
                )
    if plan.surgery.rescaled:
        notes.append(
            f"scaled {len(plan.surgery.rescaled)} means over the channels by the share kept "
            f"(a Mul after each, so each stays the sum over the source's count): "
            + ", ".join(plan.surgery.rescaled)
        )
    after, _ = g.weight_stats(model)
    if after != plan.predicted:
        raise RuntimeError(
            f"structured pruning left {after:,} parameters where its groups predicted "
            f"{plan.predicted:,}"
        )
    if shifts:
        pc.apply_shifts(plan.surgery, shifts)
        after, _ = g.weight_stats(model)
        notes.append(f"added the removed channels' mean input to the bias of {len(shifts)} layers")
    reached = len(plan.groups.reached_layers())
    notes.append(
        f"structured: {len(pruned_layers)}/{len(layers)} layers pruned "
        f"({reached} reached by a prunable group), parameters {plan.before:,} -> {after:,}"
    )
    return True


def _conv_channels(plan: StructuredPlan) -> tuple[dict[str, np.ndarray], set[str]]:
    """For `channel_map`: Conv / ConvTranspose output tensor -> indices of the channels
    it keeps, and the outputs of those that lose input channels and feed no
    scale-sensitive activation (see `channel_map` for why)."""
    readers = plan.groups.d.m.consumers  # the graph before surgery, as here

    def scale_sensitive(name: str) -> bool:
        # GELU below opset 20 is x * (1 + Erf(x / sqrt 2)) / 2: look through one Div / Mul.
        near = readers.get(name, [])
        ops = {n.op_type for n in near}
        ops |= {
            r.op_type
            for n in near
            if n.op_type in ("Div", "Mul")
            for r in readers.get(n.output[0], [])
        }
        return bool(ops & SCALE_SENSITIVE)

    kept, unmatched = {}, set()
    for mem in plan.groups.d.members.values():
        if mem.index != 1 or mem.node.op_type not in ("Conv", "ConvTranspose"):
            continue
        gone = plan.surgery.gone[mem.ids]
        out = mem.node.output[0]
        if mem.role == "out":
            kept[out] = np.flatnonzero(~gone)
        elif mem.role == "in" and gone.any() and not scale_sensitive(out):
            unmatched.add(out)
    return kept, unmatched
