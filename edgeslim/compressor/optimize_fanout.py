"""spec.optimize split into steps that separate processes (Kubernetes Jobs) can run.

    edgeslim compress SPEC --plan          <prefix>/plan.json: the ordered candidate recipes
    edgeslim compress SPEC --candidate N   <prefix>/candidates/N/model.onnx + manifest.json
    edgeslim compress SPEC --pick          the winner's model + manifest, as a local search writes

The plan is what needs nothing but the source, so its candidates are
independent: the formats on the source and, with a trainDataset, the first
pruning probe and both of the ones that can follow it (a second cut of its
student, a retry at another learning rate: one of those is measured for
nothing, and the distillations run in parallel instead of one after the
other). The adaptive rest (mixed precision grown from the sensitivity of the
static base, the later cuts, each student's formats) depends on results; it
runs in the pick step, which
takes every stored candidate as already measured and evaluates in-process
any the candidate runs did not store, so a pick is right whatever ran before.

A candidate already stored for the same spec, input bytes and recipe is not
evaluated again: a restarted Job, or a search resumed after a restart, only
does what is left.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field, ValidationError

from edgeslim import storage
from edgeslim.api.base import GROUP_VERSION, OpenWireModel
from edgeslim.api.result import (
    CandidateFigures,
    EvaluationFigures,
    InputIdentity,
    StepRecord,
)
from edgeslim.api.spec import CompressedModel
from edgeslim.compressor import evaluate, optimize
from edgeslim.compressor import pipeline as p
from edgeslim.compressor.optimize_candidates import (
    CandidateResult,
    Recipe,
    evaluate_candidate,
    format_recipes,
)
from edgeslim.errors import BadInput

PLAN_FILE = "plan.json"
CANDIDATES_DIR = "candidates"
# A plan or candidate manifest is a few KiB; anything far bigger is not ours to parse.
RECORD_MAX_BYTES = 4 * 1024 * 1024


class OptimizePlan(OpenWireModel):
    """The candidates of a search that can run independently, in the order the search tries them."""

    api_version: Literal["edgeslim.io/v1alpha1"] = Field(default=GROUP_VERSION, alias="apiVersion")
    kind: Literal["OptimizePlan"] = "OptimizePlan"
    name: str
    namespace: str
    spec_hash: str
    inputs: list[InputIdentity]
    recipes: list[Recipe] = Field(min_length=1)


class CandidateRecord(OpenWireModel):
    """One candidate measured by a run of its own: what the pick step needs to compare it."""

    api_version: Literal["edgeslim.io/v1alpha1"] = Field(default=GROUP_VERSION, alias="apiVersion")
    kind: Literal["OptimizeCandidate"] = "OptimizeCandidate"
    name: str
    namespace: str
    spec_hash: str
    inputs: list[InputIdentity]
    recipe: Recipe
    figures: CandidateFigures
    records: list[StepRecord] = Field(default_factory=list)
    evaluation: EvaluationFigures | None = None
    latency_p95_ms: float | None = None
    model_uri: str | None = None
    """The candidate's model (None: it could not be built)."""
    model_sha256: str | None = None


class PlanMessage(OpenWireModel):
    """What a plan step tells the operator through its pod's termination message."""

    kind: Literal["OptimizePlan"] = "OptimizePlan"
    candidates: int
    plan_uri: str


def write_plan_message(plan: OptimizePlan, uri: str) -> Path | None:
    """The plan's size for the operator, which then starts one Job per candidate."""
    path = os.environ.get("EDGESLIM_TERMINATION_LOG")
    if not path:
        if not Path("/dev/termination-log").exists():
            return None
        path = "/dev/termination-log"
    message = PlanMessage(candidates=len(plan.recipes), plan_uri=uri)
    Path(path).write_text(json.dumps(message.wire(), separators=(",", ":")))
    return Path(path)


def plan_uri(prefix: str) -> str:
    return storage.join(prefix, PLAN_FILE)


def candidate_prefix(prefix: str, index: int) -> str:
    return storage.join(prefix, f"{CANDIDATES_DIR}/{index}/")


def _check_optimize(obj: CompressedModel, what: str) -> None:
    if obj.spec.optimize is None:
        raise BadInput(f"{what}: the spec has no optimize section (it runs a fixed pipeline)")


def _read(uri: str, model: type, what: str):
    """The stored record at `uri`, or None when it is absent or not one of ours."""
    if not storage.exists(uri):
        return None
    try:
        return model.model_validate_json(
            storage.read_bytes(uri, max_bytes=RECORD_MAX_BYTES, what=what)
        )
    except (BadInput, ValidationError, ValueError):
        return None


def _same_run(record, f: p.Fetched) -> bool:
    return (record.name, record.namespace, record.spec_hash) == (
        f.obj.metadata.name,
        f.namespace,
        f.spec_hash,
    ) and {(i.uri, i.sha256) for i in record.inputs} == {(i.uri, i.sha256) for i in f.inputs}


def write_plan(
    obj: CompressedModel, *, output: str | None, workdir, log: Callable[[str], None], progress
) -> tuple[OptimizePlan, str]:
    """Write (or keep, when the same one is stored) the plan under the object's prefix."""
    _check_optimize(obj, "--plan")
    f = p.fetch_inputs(obj, output=output, workdir=workdir, log=log)
    uri = plan_uri(f.prefix)
    stored = _read(uri, OptimizePlan, "stored plan")
    if stored is not None and _same_run(stored, f):
        log(f"keeping the stored plan {uri} ({len(stored.recipes)} candidates)")
        return stored, uri
    ld = p.load_inputs(f, progress)
    opt = obj.spec.optimize
    recipes = format_recipes(ld.source, [])
    if opt.train_dataset:
        recipes += optimize.first_prune_probes(opt.train_dataset, opt.train_dataset_sha256)
    plan = OptimizePlan(
        name=obj.metadata.name,
        namespace=f.namespace,
        spec_hash=f.spec_hash,
        inputs=f.inputs,
        # No more than the search may try: maxCandidates bounds the Jobs too.
        recipes=recipes[: opt.max_candidates],
    )
    storage.put_bytes(json.dumps(plan.wire(), indent=2).encode(), uri, "application/json")
    log(f"wrote {uri} ({len(plan.recipes)} candidates)")
    return plan, uri


def _plan_of(f: p.Fetched) -> OptimizePlan:
    uri = plan_uri(f.prefix)
    plan = _read(uri, OptimizePlan, "stored plan")
    if plan is None or not _same_run(plan, f):
        raise BadInput(
            f"no plan for this spec and these inputs at {uri}: run `edgeslim compress SPEC --plan`"
        )
    return plan


def _stored_candidate(f: p.Fetched, index: int, recipe: Recipe) -> CandidateRecord | None:
    uri = storage.join(candidate_prefix(f.prefix, index), p.MANIFEST_FILE)
    rec = _read(uri, CandidateRecord, "stored candidate")
    if rec is None or not _same_run(rec, f) or rec.recipe != recipe:
        return None
    if rec.model_uri is not None and not storage.within(
        rec.model_uri, candidate_prefix(f.prefix, index)
    ):
        return None
    return rec


def evaluate_one(
    obj: CompressedModel,
    index: int,
    *,
    output: str | None,
    workdir,
    log: Callable[[str], None],
    progress,
) -> tuple[CandidateRecord, str, bool]:
    """Evaluate candidate `index` of the stored plan and store it; (record, uri, skipped)."""
    _check_optimize(obj, "--candidate")
    f = p.fetch_inputs(obj, output=output, workdir=workdir, log=log)
    plan = _plan_of(f)
    if not 0 <= index < len(plan.recipes):
        raise BadInput(f"--candidate {index}: the plan has candidates 0..{len(plan.recipes) - 1}")
    recipe = plan.recipes[index]
    where = candidate_prefix(f.prefix, index)
    manifest_uri = storage.join(where, p.MANIFEST_FILE)
    done = _stored_candidate(f, index, recipe)
    if done is not None and done.model_uri is not None:
        try:  # the stored model must still be the one its manifest names
            f.ws.fetch(done.model_uri, done.model_sha256, f"stored candidate {index}")
        except BadInput as exc:
            log(f"candidate {index}: evaluating again, the stored model {exc}")
            done = None
    if done is not None:
        log(f"candidate {index} ({recipe.name}) is already stored: {manifest_uri}")
        return done, manifest_uri, True
    ld = p.load_inputs(f, progress)
    ctx = optimize.candidate_context(optimize.run_of(f, ld), ld.eval_data)
    log(f"candidate {index}: {recipe.name}")
    res = evaluate_candidate(recipe, ctx, index)
    model_uri = sha = None
    if res.model is not None:
        data = res.model.SerializeToString()
        model_uri = storage.join(where, p.MODEL_FILE)
        storage.put_bytes(data, model_uri)
        sha = hashlib.sha256(data).hexdigest()
    record = CandidateRecord(
        name=obj.metadata.name,
        namespace=f.namespace,
        spec_hash=f.spec_hash,
        inputs=f.inputs,
        recipe=recipe,
        figures=res.figures,
        records=res.records,
        evaluation=res.evaluation,
        latency_p95_ms=res.latency.p95_ms if res.latency else None,
        model_uri=model_uri,
        model_sha256=sha,
    )
    # The model first, the manifest last: a stored manifest names a model that is there.
    storage.put_bytes(
        json.dumps(record.wire(), indent=2).encode(), manifest_uri, "application/json"
    )
    log(f"  {'passed' if res.passed else 'failed'}: {res.figures.reason or 'within the gate'}")
    return record, manifest_uri, False


def _result_of(f: p.Fetched, rec: CandidateRecord, index: int) -> CandidateResult | None:
    """A stored candidate as the search holds it, its model read back and checked."""
    model = None
    if rec.model_uri is not None:
        try:
            path = f.ws.fetch(rec.model_uri, rec.model_sha256, f"stored candidate {index}")
            model = onnx.load(str(path))
        except (BadInput, OSError, ValueError):
            return None  # damaged or gone: evaluated again
    latency = None
    if rec.figures.latency_p50_ms is not None:
        latency = evaluate.Latency(rec.figures.latency_p50_ms, rec.latency_p95_ms or 0.0)
    figures = rec.figures.model_copy(update={"index": index})
    return CandidateResult(figures, model, rec.records, rec.evaluation, latency)


def pick(
    obj: CompressedModel,
    *,
    output: str | None,
    workdir,
    log: Callable[[str], None],
    progress,
    reuse: bool = True,
) -> p.Outcome:
    """The search with the stored candidates taken as measured; writes the winner like run()."""
    _check_optimize(obj, "--pick")
    f = p.fetch_inputs(obj, output=output, workdir=workdir, log=log)
    if reuse and (done := p.stored_result(f, log)) is not None:
        return done
    # Without a plan (its step failed or never ran) the whole search runs here.
    plan = _read(plan_uri(f.prefix), OptimizePlan, "stored plan")
    if plan is None or not _same_run(plan, f):
        log("pick: no plan for this spec and these inputs; searching in this process")
        plan = None
    recipes = plan.recipes if plan is not None else []
    keys = {json.dumps(r.wire_steps(), sort_keys=True): i for i, r in enumerate(recipes)}
    used: list[int] = []

    def prior(recipe: Recipe, index: int) -> CandidateResult | None:
        i = keys.get(json.dumps(recipe.wire_steps(), sort_keys=True))
        rec = _stored_candidate(f, i, recipes[i]) if i is not None else None
        res = _result_of(f, rec, index) if rec is not None else None
        if res is not None:
            used.append(i)
        return res

    ld = p.load_inputs(f, progress)
    outcome = optimize.run(optimize.run_of(f, ld), ld.eval_data, log, prior=prior)
    log(f"pick: {len(used)} of {len(recipes)} planned candidates were stored by their runs")
    return outcome
