"""Candidates of the optimize search: a typed recipe and the one function that measures it.

A recipe is a list of ordinary pipeline steps, so every candidate is built by
the same step classes a hand-written pipeline uses (`steps.build`), and a
passing recipe can be pasted into spec.pipeline as it is. `evaluate_candidate`
needs nothing but the recipe and a `CandidateContext`, so a candidate can run
in a process (or a Kubernetes Job) of its own.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from pydantic import Field

from edgeslim.api.base import WireModel
from edgeslim.api.result import CandidateFigures, EvaluationFigures, StepRecord
from edgeslim.api.spec import (
    Evaluation,
    Objective,
    PipelineStep,
    QuantizeConfig,
    QuantizeMode,
    SimplifyConfig,
)
from edgeslim.compressor import channel_map, evaluate, graph, steps
from edgeslim.compressor.datasets import Dataset
from edgeslim.errors import StorageUnavailable

# Formats slower than the source by more than this share are dropped under the
# latency objective (timing noise on a shared machine must not drop a tie).
SLOWER_SLACK = 0.05
# A model counts as MatMul-heavy, and gets weight-only candidates, when MatMuls
# with constant weights hold at least this share of its parameters.
MATMUL_HEAVY_SHARE = 0.5


class Recipe(WireModel):
    """One candidate: a name for people and the steps that build it."""

    name: str
    steps: list[PipelineStep] = Field(min_length=1, max_length=32)

    @property
    def float_nodes(self) -> list[str]:
        q = next((s.quantize for s in self.steps if s.quantize is not None), None)
        return list(q.exclude_nodes) if q is not None else []

    def wire_steps(self) -> list[dict]:
        return [s.wire() for s in self.steps]


@dataclass
class CandidateContext:
    """Everything a candidate's evaluation reads; the same for every candidate of a search."""

    source: onnx.ModelProto
    step_ctx: steps.StepContext
    evaluation: Evaluation
    max_metric_drop: float
    objective: Objective
    data: Dataset
    source_out: np.ndarray
    source_latency: evaluate.Latency
    latency_runs: int
    # Models after a recipe's first steps, keyed by those steps: a pruned and
    # distilled model is quantized several ways without pruning it again.
    prefixes: dict[str, tuple[onnx.ModelProto, list[StepRecord]]] = field(default_factory=dict)


@dataclass
class CandidateResult:
    figures: CandidateFigures
    model: onnx.ModelProto | None
    records: list[StepRecord]
    evaluation: EvaluationFigures | None
    latency: evaluate.Latency | None

    @property
    def passed(self) -> bool:
        return self.figures.passed


def _key(recipe_steps: list[PipelineStep]) -> str:
    return json.dumps([s.wire() for s in recipe_steps], sort_keys=True)


def _build(recipe: Recipe, ctx: CandidateContext) -> tuple[onnx.ModelProto, list[StepRecord]]:
    model, records = ctx.source, []
    start = 0
    for n in range(len(recipe.steps), 0, -1):  # longest cached prefix
        if (hit := ctx.prefixes.get(_key(recipe.steps[:n]))) is not None:
            (model, records), start = hit, n
            break
    current = graph.figures(model.SerializeToString(), model)
    for i in range(start, len(recipe.steps)):
        entry = recipe.steps[i]
        model, record = steps.run_recorded(entry, model, current, ctx.step_ctx)
        records = [*records, record]  # a new list: cached prefixes keep theirs
        current = record.after
        if entry.type in ("prune", "distill"):  # the costly steps: later recipes extend them
            ctx.prefixes[_key(recipe.steps[: i + 1])] = (model, records)
    return model, records


def evaluate_candidate(recipe: Recipe, ctx: CandidateContext, index: int = 0) -> CandidateResult:
    """Build `recipe` from the source and measure it: sizes, metric, drop, latency, verdict.

    A recipe that cannot be built or run (a format onnxruntime refuses for this
    graph) is a failed candidate with the reason, never the end of the search.
    """
    began = time.perf_counter()
    base = {"index": index, "name": recipe.name, "recipe": recipe.wire_steps()}
    base["float_nodes"] = recipe.float_nodes
    try:
        model, records = _build(recipe, ctx)
        model = channel_map.without(model)  # measured and written as the artifact would be
        data = model.SerializeToString()
        sess = evaluate.session(data)
        out = evaluate.run_batched(sess, ctx.data)
        ev = evaluate.evaluation_figures(ctx.evaluation, ctx.data, ctx.source_out, out)
        lat = evaluate.latency(sess, ctx.data, ctx.latency_runs)
    except (StorageUnavailable, MemoryError):
        raise  # not the recipe's fault: the run fails and can be retried
    except Exception as exc:
        # onnxruntime's quantizers are Python code that fails on graphs they do not
        # expect with any exception type (KeyError, AssertionError, ...): for a search
        # that is one recipe that does not work here, recorded with why.
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        figures = CandidateFigures(
            **base, reason=f"failed: {text}", seconds=round(time.perf_counter() - began, 3)
        )
        return CandidateResult(figures, None, [], None, None)
    fig = graph.figures(data, model)
    reason = ""
    if ev.drop > ctx.max_metric_drop:
        reason = f"drop {ev.drop:+.4f} exceeds maxMetricDrop {ctx.max_metric_drop:g}"
    elif ctx.objective is Objective.latency and lat.p50_ms > ctx.source_latency.p50_ms * (
        1 + SLOWER_SLACK
    ):
        reason = (
            f"slower than the source ({lat.p50_ms:.3f} ms vs "
            f"{ctx.source_latency.p50_ms:.3f} ms p50)"
        )
    figures = CandidateFigures(
        **base,
        size_bytes=fig.size_bytes,
        gzip_size_bytes=fig.gzip_size_bytes,
        metric=ev.compressed,
        drop=ev.drop,
        latency_p50_ms=round(lat.p50_ms, 4),
        passed=not reason,
        reason=reason,
        seconds=round(time.perf_counter() - began, 3),
    )
    return CandidateResult(figures, model, records, ev, lat)


def objective_key(c: CandidateFigures, objective: Objective) -> tuple[float, float]:
    """Smaller is better; ties go to the smaller drop."""
    main = {
        Objective.download: float(c.gzip_size_bytes),
        Objective.size: float(c.size_bytes),
        Objective.latency: c.latency_p50_ms if c.latency_p50_ms is not None else float("inf"),
    }[objective]
    return main, c.drop if c.drop is not None else float("inf")


def quantize_step(**config) -> PipelineStep:
    return PipelineStep(quantize=QuantizeConfig(**config))


def matmul_weight_share(model: onnx.ModelProto) -> float:
    """Share of the parameters held by MatMul weight matrices (weight-only's target)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    total = sum(sizes.values()) or 1
    in_matmul = sum(
        sizes.get(n.input[1], 0)
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) > 1
    )
    return in_matmul / total


def format_recipes(
    model: onnx.ModelProto, prefix: list[PipelineStep], lead: str = ""
) -> list[Recipe]:
    """Quantization formats worth trying on `model`, the naive one first.

    Static QDQ first (what a user tries first and the base of mixed precision),
    then what usually keeps more accuracy or suits the graph better.
    """
    static = QuantizeMode.static
    formats: list[tuple[str, dict]] = [
        ("static int8 per-channel minmax", {"mode": static}),
        ("dynamic int8", {"mode": QuantizeMode.dynamic}),
    ]
    heavy = matmul_weight_share(model) >= MATMUL_HEAVY_SHARE
    if heavy:
        formats.append(("weight-only int4", {"mode": QuantizeMode.weight_only, "bits": 4}))
    formats += [
        (
            "static int8 per-channel percentile",
            {"mode": static, "calibration_method": "percentile"},
        ),
        ("static int8 per-tensor minmax", {"mode": static, "per_channel": False}),
        ("static int8 per-channel entropy", {"mode": static, "calibration_method": "entropy"}),
    ]
    if heavy:
        formats.append(("weight-only int8", {"mode": QuantizeMode.weight_only, "bits": 8}))
    formats.append(("fp16", {"mode": QuantizeMode.fp16}))
    lead = f"{lead} + " if lead else ""
    recipes = [
        Recipe(name=lead + name, steps=[*prefix, quantize_step(**cfg)]) for name, cfg in formats
    ]
    if heavy:
        # Measured on the toy BERT of bench/optimize.py (batch 1, one thread): a small
        # transformer's time goes to its many tiny nodes (shape arithmetic of the
        # attention mask, Reshape chains), not to its MatMuls. onnxslim folds those
        # (272 -> 125 nodes) and per-tensor dynamic int8 adds the fewest nodes and
        # bytes: 1.3x faster and 4.3x smaller where per-channel dynamic int8 alone is
        # 1.2x and 3.7x. onnxruntime's transformer fusions (SkipLayerNorm, BiasGelu)
        # measured slower there, and MatMulNBits int4 slower than fp32.
        recipes.insert(
            2,
            Recipe(
                name=lead + "simplify + dynamic int8 per-tensor",
                steps=[
                    *prefix,
                    PipelineStep(simplify=SimplifyConfig()),
                    quantize_step(mode=QuantizeMode.dynamic, per_channel=False),
                ],
            ),
        )
    return recipes


def with_float_nodes(recipe: Recipe, nodes: list[str]) -> Recipe:
    """`recipe` with its quantize step keeping `nodes` in float."""
    out = []
    for s in recipe.steps:
        if s.quantize is not None:
            q = s.quantize.model_copy(update={"exclude_nodes": list(nodes)})
            s = PipelineStep(quantize=q)
        out.append(s)
    return Recipe(name=f"{recipe.name}, {len(nodes)} nodes float", steps=out)
