"""spec.optimize: find the best recipe within the gate instead of being told one.

The search, in order, each stage only while the budget lasts:
1. formats: static QDQ (per-channel / per-tensor, minmax / percentile /
   entropy), dynamic int8, weight-only int4/int8 for MatMul-heavy models, fp16;
2. sensitivity and mixed precision, when static int8 misses the gate: the
   nodes whose quantization costs most (optimize_sensitivity) stay in float,
   as few as the gate allows (doubling, then bisection);
3. with a trainDataset, iterative structured pruning: cut, distill, cut the
   student again, each passing student quantized with the passing formats.

Every candidate is a list of ordinary pipeline steps measured by
`optimize_candidates.evaluate_candidate`. The best passing candidate is
written (model, then manifest) as soon as it is found, so a budget that runs
out, a kill or a drained node leaves it usable; its manifest says the search
was not complete, so a rerun searches again rather than reusing it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeslim import storage
from edgeslim.api.result import (
    CandidateFigures,
    CompressionResult,
    GateVerdict,
    InputIdentity,
    MemoryFigures,
    ModelFigures,
    NodeSensitivity,
    SearchRecord,
)
from edgeslim.api.spec import (
    CompressedModel,
    Criterion,
    DistillConfig,
    PipelineStep,
    PruneConfig,
    PruneMethod,
    QuantizeMode,
)
from edgeslim.compressor import evaluate, graph, optimize_sensitivity, steps
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.optimize_candidates import (
    CandidateContext,
    CandidateResult,
    Recipe,
    evaluate_candidate,
    format_recipes,
    objective_key,
    with_float_nodes,
)
from edgeslim.errors import BadInput

# Evaluation samples the sensitivity analysis runs per node: enough to rank, cheap.
SENSITIVITY_SAMPLES = 128
# Sensitivities kept in the manifest.
SENSITIVITY_REPORTED = 20
# Iterative pruning: the first cut (share of the channels left), halved after a cut
# fails at every learning rate, until it is below PRUNE_MIN_CUT.
PRUNE_START, PRUNE_MIN_CUT = 0.5, 0.1
# Learning rates a failed cut is distilled at again (the first try uses distill's default).
PRUNE_RETRY_RATES = (1e-2,)
# Distillation per cut: long enough for a student that lost half its channels to recover
# (measured on the digits CNN: 5 epochs left a 12% cut 0.7 points short, 30 recover a
# 50% cut fully); early stopping on the held-out split ends it sooner when it plateaus.
PRUNE_DISTILL_EPOCHS, PRUNE_DISTILL_PATIENCE = 30, 8
# Quantization formats (those that passed on the source, best first) tried per student.
PRUNE_FORMATS = 2


class BudgetSpent(Exception):
    """maxCandidates or maxSeconds reached: the search ends with what it has."""


@dataclass
class Run:
    """What compress() hands over after fetching and checking the inputs."""

    obj: CompressedModel
    prefix: str
    namespace: str
    spec_hash: str
    inputs: list[InputIdentity]
    source: onnx.ModelProto
    source_fig: ModelFigures
    step_ctx: steps.StepContext


def run_of(f, ld) -> Run:
    """The Run of a spec whose inputs pipeline.fetch_inputs and load_inputs prepared."""
    return Run(
        f.obj, f.prefix, f.namespace, f.spec_hash, f.inputs, ld.source, ld.source_fig, ld.step_ctx
    )


@dataclass
class Search:
    ctx: CandidateContext
    max_candidates: int
    deadline: float
    on_best: Callable[[Search], None]
    log: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    results: list[CandidateResult] = field(default_factory=list)
    best: CandidateResult | None = None
    closest: CandidateResult | None = None
    """The built candidate with the smallest drop: the rejected artifact if none passes."""
    base: CandidateResult | None = None
    """The first plain static int8 candidate built: what mixed precision starts from."""
    sensitivity: list[NodeSensitivity] = field(default_factory=list)
    stopped_by: str | None = None
    prior: Callable[[Recipe, int], CandidateResult | None] | None = None
    """Candidates measured elsewhere (a candidate Job): taken as they are, not evaluated again."""
    clock: Callable[[], float] = time.monotonic
    """What `deadline` is read against (tests pass a fake one)."""

    def candidate(self, recipe: Recipe) -> CandidateResult:
        if len(self.results) >= self.max_candidates:
            raise BudgetSpent("maxCandidates")
        if self.clock() >= self.deadline:
            raise BudgetSpent("maxSeconds")
        index = len(self.results)
        self.log(f"candidate {index}: {recipe.name}")
        res = self.prior(recipe, index) if self.prior is not None else None
        if res is None:
            res = evaluate_candidate(recipe, self.ctx, index)
        else:
            self.log("  (measured by its own run)")
            if res.model is not None and recipe.steps[-1].type in ("prune", "distill"):
                # As evaluate_candidate caches it: later recipes extend this model.
                key = json.dumps(recipe.wire_steps(), sort_keys=True)
                self.ctx.prefixes[key] = (res.model, res.records)
        self.results.append(res)
        f = res.figures
        self.log(
            f"  {'passed' if f.passed else 'failed'}: "
            + (f"gzip {f.gzip_size_bytes:,} B, drop {f.drop:+.4f}" if f.drop is not None else "")
            + (f" ({f.reason})" if f.reason else "")
        )
        if res.passed and (
            self.best is None
            or objective_key(f, self.ctx.objective)
            < objective_key(self.best.figures, self.ctx.objective)
        ):
            self.best = res
            self.on_best(self)
        if f.drop is not None and (self.closest is None or f.drop < self.closest.figures.drop):
            self.closest = res
        if self.base is None and res.model is not None and _plain_static(f.recipe):
            self.base = res
        # Only these models are needed later; the rest would hold one model per candidate.
        for r in self.results:
            if r.model is not None and not any(
                r is k for k in (self.best, self.closest, self.base)
            ):
                r.model = None
        return res

    def passing(self) -> list[CandidateResult]:
        return sorted(
            (r for r in self.results if r.passed),
            key=lambda r: objective_key(r.figures, self.ctx.objective),
        )


def _formats(search: Search, prefix: list[PipelineStep], model: onnx.ModelProto) -> None:
    for recipe in format_recipes(model, prefix):
        search.candidate(recipe)


def _plain_static(recipe: list[dict]) -> bool:
    """One static quantize step, nothing kept float."""
    if len(recipe) != 1 or "quantize" not in recipe[0]:
        return False
    q = recipe[0]["quantize"]
    return q.get("mode") == QuantizeMode.static and not q.get("excludeNodes")


def _mixed_precision(search: Search) -> None:
    """Keep the most sensitive regions of static int8 in float until the gate holds."""
    if any(r.passed for r in search.results if _plain_static(r.figures.recipe)):
        return
    # The first is per-channel minmax, which keeps every range whole (percentile and
    # entropy clip them): an outlier channel then costs only resolution, which keeping
    # its region float gives back.
    base = search.base
    if base is None:
        return
    ctx = search.ctx
    search.log(f"sensitivity of the nodes quantized by {base.figures.name}")
    sample = ctx.data.head(SENSITIVITY_SAMPLES)
    ranked = optimize_sensitivity.analyse(
        base.model, ctx.source, sample, ctx.source_out[: len(sample)]
    )
    search.sensitivity = ranked[:SENSITIVITY_REPORTED]
    order = [s for s in ranked if s.recovery > 0]
    if not order:
        return
    recipe = Recipe.model_validate({"name": base.figures.name, "steps": base.figures.recipe})

    def float_nodes(k: int) -> list[str]:  # the nodes that keep the k worst tensors float
        return list(dict.fromkeys(n for s in order[:k] for n in s.nodes))

    # Doubling finds a count of float tensors that passes; bisection then the fewest.
    fail, k = 0, 1
    passed_at: int | None = None
    while passed_at is None:
        k = min(k, len(order))
        if search.candidate(with_float_nodes(recipe, float_nodes(k))).passed:
            passed_at = k
        elif k == len(order):
            return
        else:
            fail, k = k, k * 2
    while passed_at - fail > 1:
        mid = (fail + passed_at) // 2
        if search.candidate(with_float_nodes(recipe, float_nodes(mid))).passed:
            passed_at = mid
        else:
            fail = mid


def prune_cut(
    sparsity: float, train: str, train_sha: str | None, learning_rate: float | None = None
) -> list[PipelineStep]:
    """The steps of one sparsity probe: a structured cut, then distillation."""
    distill = DistillConfig(
        dataset=train,
        dataset_sha256=train_sha,
        epochs=PRUNE_DISTILL_EPOCHS,
        patience=PRUNE_DISTILL_PATIENCE,
    )
    if learning_rate is not None:
        distill = distill.model_copy(update={"learning_rate": learning_rate})
    return [
        PipelineStep(
            prune=PruneConfig(
                method=PruneMethod.structured, sparsity=sparsity, criterion=Criterion.l1
            )
        ),
        PipelineStep(distill=distill),
    ]


def _chain_name(cuts: list[float]) -> str:
    return "prune " + " > ".join(f"{c:.0%}" for c in cuts) + " + distill"


def prune_probe(
    cuts: list[tuple[float, float | None]], train: str, train_sha: str | None
) -> Recipe:
    """Iterative pruning: each (sparsity, learning rate) cuts the student the previous
    ones left and distills it again (from the source as teacher), so a deep cut is
    reached in steps the student can recover from instead of in one blow."""
    steps_: list[PipelineStep] = []
    for sparsity, lr in cuts:
        steps_ += prune_cut(sparsity, train, train_sha, lr)
    name = _chain_name([c for c, _ in cuts])
    if cuts[-1][1] is not None:
        name += f" (lr {cuts[-1][1]:g})"
    return Recipe(name=name, steps=steps_)


def first_prune_probes(train: str, train_sha: str | None) -> list[Recipe]:
    """The first probe and both of the ones that can follow it (a second cut if it
    passes, a retry at another learning rate if not): what can be measured before any
    result is known (a fanned-out search runs them in parallel)."""
    first = (PRUNE_START, None)
    return [
        prune_probe([first], train, train_sha),
        prune_probe([first, first], train, train_sha),
        prune_probe([(PRUNE_START, PRUNE_RETRY_RATES[0])], train, train_sha),
    ]


def student_formats(passing: list[CandidateFigures]) -> list[tuple[str, list[PipelineStep]]]:
    """The formats each pruned student is quantized with: the first PRUNE_FORMATS of the
    passing candidates (best first) that only simplify and quantize the source, whole,
    since the best of a MatMul-heavy model is two steps (simplify + dynamic int8)."""
    formats = [
        (c.name, [PipelineStep.model_validate(s) for s in c.recipe])
        for c in passing
        if c.recipe
        and "quantize" in c.recipe[-1]
        and all(set(s) <= {"simplify", "quantize"} for s in c.recipe)
    ]
    return formats[:PRUNE_FORMATS]


def _pruning(search: Search, train: str, train_sha: str | None) -> None:
    """Iterative structured pruning, distilled after each cut, then the survivor quantized.

    Every probe starts from the last student that passed (not from the source): cut,
    distill, cut more. A cut that fails is retried at other learning rates, then
    halved; the chain ends when the cut gets below PRUNE_MIN_CUT. Each passing student
    is quantized with the formats that passed on the source, best first, and the
    first that holds the gate is kept: the search's best is the deepest chain that
    still passes once quantized.
    """
    formats = student_formats([r.figures for r in search.passing()])
    chain: list[tuple[float, float | None]] = []
    cut = PRUNE_START
    last = 0.0  # seconds the last probe took: the next one takes about as long
    size = search.ctx.source.ByteSize()  # of the last passing student
    while cut >= PRUNE_MIN_CUT:
        passed = False
        for lr in (None, *PRUNE_RETRY_RATES):
            probe = prune_probe([*chain, (cut, lr)], train, train_sha)
            # A probe that cannot end within maxSeconds is not started: the budget
            # is the search's, not a deadline to overrun by one more distillation.
            if search.clock() + last > search.deadline:
                raise BudgetSpent("maxSeconds")
            res = search.candidate(probe)
            last = res.figures.seconds or 0.0
            if res.passed:
                passed = True
                break
            if res.figures.drop is None:  # could not be built: nor will a smaller cut be
                return
        if not passed:
            cut = round(cut / 2, 4)
            continue
        if res.figures.size_bytes >= size:  # nothing left to cut (every layer at its minimum)
            return
        size = res.figures.size_bytes
        chain.append((cut, lr))
        for format_name, format_steps in formats:
            name = f"{probe.name} + {format_name}"
            if search.candidate(Recipe(name=name, steps=[*probe.steps, *format_steps])).passed:
                break


def search_all(search: Search, train: str | None, train_sha: str | None) -> None:
    try:
        _formats(search, [], search.ctx.source)
        _mixed_precision(search)
        if train:
            _pruning(search, train, train_sha)
    except BudgetSpent as exc:
        search.stopped_by = str(exc)
        search.log(f"search stopped: {exc} reached")


# ----------------------------------------------------------------- results


def candidate_context(r: Run, eval_data: Dataset) -> CandidateContext:
    """What every candidate of this spec is measured against: the source's outputs and
    latency, computed once. A candidate Job builds the same from the same spec."""
    spec = r.obj.spec
    assert spec.optimize is not None
    cfg = spec.evaluation
    # The source is the user's: what it fails on is BadInput naming it, as in the pipeline.
    src_sess = evaluate.session(r.source, where=spec.source.uri)
    return CandidateContext(
        source=r.source,
        # One calibration per model, data and method, however many ways it is quantized.
        step_ctx=dataclasses.replace(
            r.step_ctx, calibration_cache=r.step_ctx.workdir / "calibration"
        ),
        evaluation=cfg,
        max_metric_drop=cfg.max_metric_drop,
        objective=spec.optimize.objective,
        data=eval_data,
        source_out=evaluate.run_batched(
            src_sess, eval_data, label="evaluate source", where=spec.source.uri
        ),
        source_latency=evaluate.latency(src_sess, eval_data, cfg.latency_runs),
        latency_runs=cfg.latency_runs,
    )


def run(
    r: Run,
    eval_data: Dataset,
    log: Callable[[str], None],
    prior: Callable[[Recipe, int], CandidateResult | None] | None = None,
) -> object:
    """Search, write the best (or the closest, rejected) with the whole search recorded."""
    from edgeslim.compressor import pipeline as p

    opt = r.obj.spec.optimize
    assert opt is not None
    cfg = r.obj.spec.evaluation
    ctx = candidate_context(r, eval_data)
    src_lat = ctx.source_latency
    workdir = r.step_ctx.workdir
    source_path = workdir / "source.onnx"
    onnx.save(r.source, source_path)
    sample = workdir / "memprobe-sample.npz"
    np.savez(sample, **eval_data.batch(0, 1))
    source_rss = evaluate.peak_rss_bytes(source_path, sample)

    def write(search: Search, chosen: CandidateResult, complete: bool) -> p.Outcome:
        model = chosen.model
        assert model is not None and chosen.evaluation is not None
        passed = chosen.passed
        model_uri = storage.join(r.prefix, p.MODEL_FILE if passed else p.REJECTED_MODEL_FILE)
        manifest_uri = storage.join(r.prefix, p.MANIFEST_FILE)
        data = model.SerializeToString()
        cand_path = workdir / "candidate.onnx"
        cand_path.write_bytes(data)
        artifact = graph.figures(data, model, uri=model_uri)
        reason = chosen.figures.reason
        gate = GateVerdict(
            passed=passed,
            max_metric_drop=cfg.max_metric_drop,
            reason=(
                f"candidate {chosen.figures.index} ({chosen.figures.name}): "
                + p._gate_reason(chosen.evaluation, cfg.max_metric_drop, passed)
                + (f"; {reason}" if reason and not reason.startswith("drop") else "")
            ),
        )
        result = CompressionResult(
            name=r.obj.metadata.name,
            namespace=r.namespace,
            spec_hash=r.spec_hash,
            source=r.source_fig,
            artifact=artifact,
            steps=chosen.records,
            evaluation=chosen.evaluation,
            latency=evaluate.latency_figures(src_lat, chosen.latency),
            memory=MemoryFigures(
                source_peak_rss_bytes=source_rss,
                compressed_peak_rss_bytes=evaluate.peak_rss_bytes(cand_path, sample),
            ),
            compression_ratio=round(r.source_fig.size_bytes / artifact.size_bytes, 4),
            download_ratio=round(r.source_fig.gzip_size_bytes / artifact.gzip_size_bytes, 4),
            gate=gate,
            versions=p._versions(),
            inputs=r.inputs,
            candidates=[c.figures for c in search.results],
            chosen=chosen.figures.index,
            search=SearchRecord(
                objective=opt.objective.value,
                complete=complete,
                stopped_by=search.stopped_by,
                seconds=round(time.monotonic() - search.started, 3),
                sensitivity=search.sensitivity,
                sensitive_nodes=chosen.figures.float_nodes,
            ),
        )
        # The model first, the manifest last: a manifest names a file that is there.
        storage.put_bytes(data, model_uri)
        storage.put_bytes(
            json.dumps(result.wire(), indent=2).encode(), manifest_uri, "application/json"
        )
        return p.Outcome(result=result, model_uri=model_uri, manifest_uri=manifest_uri)

    def on_best(search: Search) -> None:
        log(f"best so far: candidate {search.best.figures.index}, written to {r.prefix}")
        write(search, search.best, complete=False)

    search = Search(
        ctx=ctx,
        max_candidates=opt.max_candidates,
        deadline=time.monotonic() + opt.max_seconds,
        on_best=on_best,
        log=log,
        prior=prior,
    )
    search_all(search, opt.train_dataset, opt.train_dataset_sha256)
    chosen = search.best or search.closest
    if chosen is None:  # nothing could be built at all
        reasons = "; ".join(f"{c.figures.name}: {c.figures.reason}" for c in search.results)
        raise BadInput(f"optimize: no candidate could be built ({reasons[:1500]})")
    return write(search, chosen, complete=True)
