"""What the handlers do: read objects, call the pure builders, apply the result.

Every status write is a read-compute-write with the object's resourceVersion
as precondition, so the three writers (the model handler, the Job watcher and
the queue dispatcher) never overwrite each other with stale state: on 409 the
writer re-reads and recomputes, and a computation that no longer applies
(another spec hash by now) writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from edgeslim import metrics, storage
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase
from edgeslim.cli import format_validation_error
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.operator import events, jobs, results, serving, status
from edgeslim.operator.kube import Conflict, Kube, api_message
from edgeslim.operator.names import APPLIED_HASH_ANNOTATION, MODEL_LABEL, job_name, serving_name
from edgeslim.operator.queue import ModelKey, Slots, Waiting
from edgeslim.operator.settings import Settings
from edgeslim.operator.status import COMPRESSED_PHASES, Transition

Obj = dict[str, Any]
log = logging.getLogger("edgeslim.operator")

STATUS_WRITE_ATTEMPTS = 5
MANIFEST_MAX_BYTES = 1024 * 1024


class InvalidSpec(Exception):
    """The object can never work as written: phase Failed, reason InvalidSpec, no retry."""


# ------------------------------------------------------------- index entries


@dataclass(frozen=True)
class ModelEntry:
    """What the queue and the Job watcher need to know about a CompressedModel."""

    created: str
    phase: str | None
    spec_hash: str | None
    job_name: str | None
    generation: int | None
    observed_generation: int | None


@dataclass(frozen=True)
class JobEntry:
    name: str
    spec_hash: str
    state: jobs.JobState


def model_entry(body: Obj) -> ModelEntry:
    meta, raw = body.get("metadata") or {}, body.get("status") or {}
    # Only the fields the queue needs, read leniently: an index must never fail.
    return ModelEntry(
        created=meta.get("creationTimestamp") or "",
        phase=raw.get("phase"),
        spec_hash=raw.get("specHash"),
        job_name=raw.get("jobName"),
        generation=meta.get("generation"),
        observed_generation=raw.get("observedGeneration"),
    )


def job_entry(body: Obj) -> JobEntry:
    ref = jobs.JobRef.of(body)
    return JobEntry(name=ref.name, spec_hash=ref.spec_hash, state=jobs.job_state(body))


def snapshot(index: Any) -> list[tuple[Any, list[Any]]]:
    """A copy of a kopf index. kopf updates indexes on the event loop while sync
    handlers read them from threads, so a read may race a resize: just retry."""
    if index is None:
        return []
    for _ in range(20):
        try:
            return [(k, list(v)) for k, v in list(index.items())]
        except RuntimeError:
            continue
    return []


def running_jobs(jobs_index: Any) -> dict[ModelKey, set[str]]:
    out: dict[ModelKey, set[str]] = {}
    for key, entries in snapshot(jobs_index):
        names = {e.name for e in entries if e.state is jobs.JobState.running}
        if names:
            out[key] = names
    return out


def queued_models(models_index: Any) -> list[Waiting]:
    return [
        Waiting(e.created, key[0], key[1], e.job_name or "")
        for key, entries in snapshot(models_index)
        for e in entries
        if e.phase == Phase.queued and e.job_name
    ]


def unrecorded_results(models_index: Any, jobs_index: Any) -> list[tuple[str, str]]:
    """(namespace, job) of finished Jobs whose model still shows them in progress:
    the Job watcher missed or failed on them, and the resync catches up."""
    models = {k: es[0] for k, es in snapshot(models_index) if es}
    found = []
    for key, entries in snapshot(jobs_index):
        entry = models.get(key)
        if entry is None or entry.phase in COMPRESSED_PHASES:
            continue
        for j in entries:
            done = j.state in (jobs.JobState.succeeded, jobs.JobState.failed)
            if done and j.name == entry.job_name and j.spec_hash == entry.spec_hash:
                found.append((key[0], j.name))
    return found


# ------------------------------------------------------------------ runtime


@dataclass
class Runtime:
    """The operator's live parts, created at startup and kept in kopf's memo."""

    settings: Settings
    kube: Kube
    slots: Slots
    phases: metrics.PhaseTracker = field(default_factory=metrics.PhaseTracker)
    models_index: Any = None
    jobs_index: Any = None
    ready: bool = False

    def running_count(self) -> int:
        return sum(len(v) for v in running_jobs(self.jobs_index).values())

    def queued_count(self) -> int:
        return len(self.slots.waiting_now(queued_models(self.models_index)))


# ------------------------------------------------------------- status writes


def _key(body: Obj) -> ModelKey:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def write_status(
    rt: Runtime,
    key: ModelKey,
    compute: Callable[[CompressedModelStatus, Obj], Transition | Obj | None],
    body: Obj | None = None,
) -> Obj | None:
    """Read-compute-write of status under resourceVersion; returns the new status.

    `compute` gets the parsed status and the object and returns a Transition,
    a whole new status dict, or None for "nothing to write".
    """
    namespace, name = key
    for _ in range(STATUS_WRITE_ATTEMPTS):
        if body is None:
            body = rt.kube.get_model(namespace, name)
            if body is None:
                return None
        raw = body.get("status") or {}
        current = status.parse(raw)
        generation = body["metadata"].get("generation")
        wanted = compute(current, body)
        if wanted is None:
            return None
        if isinstance(wanted, Transition):
            new = status.apply(current, generation, wanted, status.now())
        else:
            new = wanted
        patch = status.merge_patch(raw, new)
        if not patch:
            return new
        try:
            rt.kube.patch_model_status(
                namespace, name, patch, body["metadata"].get("resourceVersion")
            )
        except Conflict:
            body = None
            continue
        if isinstance(wanted, Transition):
            old_phase = (
                Phase(raw["phase"]) if raw.get("phase") in Phase._value2member_map_ else None
            )
            _post_event(
                rt,
                body,
                events.for_transition(old_phase, wanted.phase, wanted.reason, wanted.message),
            )
        return new
    raise Conflict(f"{namespace}/{name}: status kept changing under {STATUS_WRITE_ATTEMPTS} writes")


def _post_event(rt: Runtime, body: Obj, event: tuple[str, str, str] | None) -> None:
    if event is None:
        return
    try:
        rt.kube.post_event(events.build(body, *event))
    except Exception as exc:  # an Event is a courtesy; never fail a reconcile on it
        log.warning("event for %s/%s not posted: %s", *_key(body), exc)


# ------------------------------------------------------------ the model side


def parse_model(body: Obj) -> CompressedModel:
    try:
        return CompressedModel.model_validate(body)
    except ValidationError as exc:
        raise InvalidSpec(format_validation_error(exc)) from exc


def fail_invalid(rt: Runtime, body: Obj, message: str) -> None:
    """Phase Failed / InvalidSpec for whatever the spec currently is."""

    def compute(cur: CompressedModelStatus, _b: Obj) -> Transition:
        return Transition(Phase.failed, "InvalidSpec", message)

    write_status(rt, _key(body), compute, body)
    rt.slots.forget(_key(body))


def fail_reconcile(rt: Runtime, body: Obj, message: str) -> None:
    """Phase Failed / ReconcileError once the retries are spent (best effort:
    the API may be what is failing)."""
    try:
        write_status(
            rt, _key(body), lambda _c, _b: Transition(Phase.failed, "ReconcileError", message)
        )
    except Exception as exc:
        log.warning("%s/%s: could not record the failure: %s", *_key(body), exc)


def reconcile_model(rt: Runtime, body: Obj) -> None:
    """Create, spec change and resume: make sure the current spec gets (or has) its Job."""
    key = _key(body)
    model = parse_model(body)  # InvalidSpec propagates; the handler records it
    spec_hash = model.spec.spec_hash()
    job = job_name(model.metadata.name, spec_hash)
    current = status.parse(body.get("status"))
    _supersede(rt, key, spec_hash)

    if current.spec_hash == spec_hash and current.phase in COMPRESSED_PHASES:
        # Same artifact (e.g. only resources or deployment changed): keep the result.
        rt.slots.forget(key)
        generation = body["metadata"].get("generation")
        write_status(rt, key, lambda cur, _b: status.touch_generation(cur, generation), body)
        if (
            model.spec.deployment is not None
            or current.serving_artifact
            or (current.last_good_artifact)
        ):
            reconcile_serving(rt, key)
        return
    if current.spec_hash == spec_hash and current.phase == Phase.compressing:
        # Resumed after a restart: the Job exists (adopted on 409) or is made again.
        start(rt, key, Waiting(body["metadata"].get("creationTimestamp", ""), *key, job), body)
        return
    if rt.settings.kueue_queue or rt.slots.unlimited:
        start(rt, key, Waiting(body["metadata"].get("creationTimestamp", ""), *key, job), body)
        return

    entry = Waiting(body["metadata"].get("creationTimestamp", ""), key[0], key[1], job)
    rt.slots.wait(entry)
    admitted = rt.slots.take(queued_models(rt.models_index), running_jobs(rt.jobs_index))
    started_self = False
    for w in admitted:
        if w.key == key:
            started_self = True
            start(rt, key, w, body)
        else:
            _start_quietly(rt, w)
    if not started_self:
        _mark_queued(rt, key, spec_hash, job, body)


def _mark_queued(rt: Runtime, key: ModelKey, spec_hash: str, job: str, body: Obj) -> None:
    limit = rt.settings.max_concurrent_jobs

    def compute(cur: CompressedModelStatus, _b: Obj) -> Transition | None:
        if cur.spec_hash == spec_hash and cur.phase in (Phase.compressing, *COMPRESSED_PHASES):
            return None  # a dispatcher started it meanwhile
        return Transition(
            Phase.queued,
            "Queued",
            f"waiting for one of {limit} compressor slots (first come, first served)",
            spec_hash=spec_hash,
            job_name=job,
        )

    write_status(rt, key, compute, body)


def _supersede(rt: Runtime, key: ModelKey, spec_hash: str) -> None:
    """Deletes Jobs of older specs: their result would describe a spec that is gone."""
    for k, entries in snapshot(rt.jobs_index):
        if k != key:
            continue
        for e in entries:
            if e.spec_hash != spec_hash:
                log.info("%s/%s: deleting superseded Job %s", *key, e.name)
                rt.kube.delete_job(key[0], e.name)


def start(rt: Runtime, key: ModelKey, entry: Waiting, body: Obj | None = None) -> None:
    """Status Compressing (Queued under Kueue), then the Job: create, or adopt on 409.

    Status first: should the operator die in between, the object says
    Compressing and a resume re-creates the Job under the same name, while a Job
    without that status could finish before the status says it ever started.
    """
    try:
        if body is None:
            body = rt.kube.get_model(*key)
            if body is None:
                rt.slots.forget(key)
                return
        try:
            model = parse_model(body)
        except InvalidSpec as exc:
            fail_invalid(rt, body, str(exc))
            return
        spec_hash = model.spec.spec_hash()
        job = job_name(model.metadata.name, spec_hash)
        if entry.job and entry.job != job:
            rt.slots.release(key, entry.job)  # the spec changed while it waited
            return
        kueue = rt.settings.kueue_queue

        def compute(cur: CompressedModelStatus, _b: Obj) -> Transition | None:
            if cur.spec_hash == spec_hash and cur.phase in COMPRESSED_PHASES:
                return None
            if kueue:
                return Transition(
                    Phase.queued,
                    "WaitingForKueue",
                    f"Job {job} waits for admission by Kueue queue {kueue}",
                    spec_hash=spec_hash,
                    job_name=job,
                )
            return Transition(
                Phase.compressing,
                "Compressing",
                f"Job {job} compresses the model",
                spec_hash=spec_hash,
                job_name=job,
            )

        written = write_status(rt, key, compute, body)
        if written is None:
            rt.slots.release(key, job)
            return
        if job in _known_jobs(rt, key):
            # Already created (this is a re-run or a resume): the live index
            # says so without a 409 round-trip.
            log.info("%s/%s: adopted existing Job %s", *key, job)
            return
        manifest = jobs.build_job(model, rt.settings, spec_hash)
        try:
            created = rt.kube.create_job(manifest)
        except ApiException as exc:
            if exc.status in (400, 422):
                # The API server refuses the Job (e.g. a malformed resource quantity).
                fail_invalid(rt, body, f"compressor Job rejected: {api_message(exc)}")
                return
            raise
        if created is not None:
            metrics.compressions_started.inc()
            log.info("%s/%s: created Job %s", *key, job)
        else:
            _adopt(rt, key, job, model)
    except BaseException:
        rt.slots.release(key, entry.job)
        raise


def _known_jobs(rt: Runtime, key: ModelKey) -> set[str]:
    """Names of the object's Jobs the Job watch has seen (any state)."""
    return {e.name for k, entries in snapshot(rt.jobs_index) if k == key for e in entries}


def _adopt(rt: Runtime, key: ModelKey, job: str, model: CompressedModel) -> None:
    existing = rt.kube.read_job(key[0], job)
    if existing is None:
        raise Conflict(f"Job {job} existed a moment ago and is gone; retrying")
    ref = jobs.JobRef.of(existing)
    if ref.owner_uid != model.metadata.uid:
        # A Job of a deleted object of the same name, not yet garbage-collected.
        raise Conflict(
            f"Job {job} belongs to an older object of this name; waiting for its removal"
        )
    log.info("%s/%s: adopted existing Job %s", *key, job)


def _start_quietly(rt: Runtime, entry: Waiting) -> None:
    """Starts a queued object from another object's handler; its failure must not
    fail that handler: the object stays queued and the resync tries again."""
    try:
        start(rt, entry.key, entry)
    except Exception as exc:
        metrics.reconcile_errors.labels(handler="dispatch").inc()
        log.warning("%s/%s: could not start: %s", *entry.key, exc)
        rt.slots.wait(entry)


def dispatch(rt: Runtime) -> None:
    """Fills free slots with the oldest queued objects."""
    if rt.slots.unlimited or rt.settings.kueue_queue:
        return
    for w in rt.slots.take(queued_models(rt.models_index), running_jobs(rt.jobs_index)):
        _start_quietly(rt, w)


def forget_model(rt: Runtime, namespace: str, name: str) -> None:
    rt.slots.forget((namespace, name))
    rt.phases.gone(namespace, name)


def observe_model(rt: Runtime, body: Obj) -> None:
    """Metrics from a watch event: phase counts and per-model gauges, no API calls."""
    meta, raw = body["metadata"], body.get("status") or {}
    res = raw.get("results") or {}
    drop = (res.get("evaluation") or {}).get("drop")
    rt.phases.seen(
        meta["namespace"],
        meta["name"],
        raw.get("phase") or "Pending",
        res.get("compressionRatio"),
        drop,
    )


# -------------------------------------------------------------- the Job side


def job_changed(rt: Runtime, event_type: str | None, body: Obj) -> None:
    """A Job with our label changed: record a final result, free its slot, start the next."""
    ref = jobs.JobRef.of(body)
    key = (ref.namespace, ref.model)
    if event_type == "DELETED":
        rt.slots.release(key, ref.name)
        dispatch(rt)
        return
    state = jobs.job_state(body)
    if state in (jobs.JobState.succeeded, jobs.JobState.failed):
        rt.slots.release(key, ref.name)
        try:
            record_result(rt, body)
        finally:
            dispatch(rt)
    elif state is jobs.JobState.running and rt.settings.kueue_queue:
        _admitted_by_kueue(rt, key, ref)


def _admitted_by_kueue(rt: Runtime, key: ModelKey, ref: jobs.JobRef) -> None:
    def compute(cur: CompressedModelStatus, _b: Obj) -> Transition | None:
        if cur.job_name != ref.name or cur.phase != Phase.queued:
            return None
        return Transition(
            Phase.compressing,
            "Compressing",
            f"Job {ref.name} admitted by Kueue",
            spec_hash=ref.spec_hash,
            job_name=ref.name,
        )

    write_status(rt, key, compute)


def _already_recorded(rt: Runtime, key: ModelKey, job: str) -> bool:
    """True when the index shows this Job's result in status already (a replay
    after restart): saves a GET and a pod list per finished Job."""
    for k, entries in snapshot(rt.models_index):
        if k == key and entries:
            e = entries[0]
            return (
                e.job_name == job
                and e.phase in COMPRESSED_PHASES
                and e.generation == e.observed_generation
            )
    return False


def record_result(rt: Runtime, job_body: Obj) -> None:
    ref = jobs.JobRef.of(job_body)
    key = (ref.namespace, ref.model)
    if _already_recorded(rt, key, ref.name):
        return
    body = rt.kube.get_model(*key)
    if body is None or body["metadata"].get("uid") != ref.owner_uid:
        return  # the object is gone (or replaced): the garbage collector takes the Job
    try:
        model = parse_model(body)
    except InvalidSpec:
        return  # the model handler reports this
    if model.spec.spec_hash() != ref.spec_hash:
        return  # superseded: the model handler deletes it
    state = jobs.job_state(job_body)
    pods = rt.kube.list_pods(ref.namespace, jobs.pod_selector(ref.uid))
    terms = jobs.terminations(pods, ref.uid)
    out = results.outcome(state, jobs.failure_reason(job_body), terms, ref, model)
    deploy = out.phase is Phase.ready and model.spec.deployment is not None
    result = out.result
    if result is not None and not result.complete and result.manifest_uri:
        result = _with_manifest(rt, model, result)
    transition = Transition(
        Phase.deploying if deploy else out.phase,
        out.reason,
        out.message,
        spec_hash=ref.spec_hash,
        job_name=ref.name,
        artifact=results.artifact_status(result) if result else None,
        results=results.results_status(result) if result else None,
    )

    def compute(cur: CompressedModelStatus, b: Obj) -> Transition | None:
        if cur.spec_hash not in (None, ref.spec_hash):
            return None  # the spec changed since this Job started
        if cur.job_name == ref.name and cur.phase in COMPRESSED_PHASES:
            return None
        return transition

    if write_status(rt, key, compute, body) is not None:
        metrics.compressions_finished.labels(result=out.metric_result).inc()
        seconds = jobs.duration_seconds(job_body)
        if seconds is not None:
            metrics.compression_duration.observe(seconds)
        log.info("%s/%s: Job %s finished: %s (%s)", *key, ref.name, out.phase.value, out.reason)
        if deploy:
            _serve_quietly(rt, key)


def _with_manifest(
    rt: Runtime, model: CompressedModel, result: results.TerminationResult
) -> results.TerminationResult:
    """A short termination message names the manifest; read the figures from it."""
    try:
        with storage_credentials(rt, model):
            raw = storage.read_bytes(
                result.manifest_uri or "", max_bytes=MANIFEST_MAX_BYTES, what="manifest"
            )
        return results.merge_manifest(result, json.loads(raw))
    except (BadInput, StorageUnavailable, ValueError, results.UntrustedResult) as exc:
        log.warning("%s: manifest %s not read: %s", model.metadata.name, result.manifest_uri, exc)
        return result


def resync(rt: Runtime) -> None:
    """Periodic safety net: records results the Job watcher missed, fills free slots."""
    for namespace, name in unrecorded_results(rt.models_index, rt.jobs_index):
        body = rt.kube.read_job(namespace, name)
        if body is not None:
            try:
                record_result(rt, body)
            except Exception as exc:
                metrics.reconcile_errors.labels(handler="resync").inc()
                log.warning("%s/%s: result not recorded yet: %s", namespace, name, exc)
    dispatch(rt)
    for key, entries in snapshot(rt.models_index):
        if entries and entries[0].phase == Phase.deploying:
            _serve_quietly(rt, key)


# ------------------------------------------------------------------- serving


def deployment_changed(rt: Runtime, event_type: str | None, deployment: Obj) -> None:
    """A serving Deployment changed (its controller reports rollout progress)."""
    meta = deployment["metadata"]
    key = (meta["namespace"], (meta.get("labels") or {}).get(MODEL_LABEL, ""))
    if not key[1]:
        return
    reconcile_serving(rt, key, None if event_type == "DELETED" else deployment)


def _serve_quietly(rt: Runtime, key: ModelKey) -> None:
    """From the Job watcher and the resync: a failure here must not fail them;
    the object stays Deploying and the resync tries again."""
    try:
        reconcile_serving(rt, key)
    except Exception as exc:
        metrics.reconcile_errors.labels(handler="serving").inc()
        log.warning("%s/%s: serving not reconciled yet: %s", *key, exc)


def reconcile_serving(rt: Runtime, key: ModelKey, deployment: Obj | None = None) -> None:
    """Status from the Deployment's rollout, then the Deployment the plan wants.

    Status first: a rollback records the failed artifact before the Deployment
    changes, so an operator that dies in between never rolls it out again.
    """
    body = rt.kube.get_model(*key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # ownerReferences: the garbage collector takes Deployment and Service
    try:
        model = parse_model(body)
    except InvalidSpec:
        return  # the model handler reports this
    namespace, name = key
    if deployment is None:
        deployment = rt.kube.read_deployment(namespace, serving_name(name))
    state = serving.rollout_state(deployment)
    if deployment is not None and state.owner_uid != model.metadata.uid:
        # An older object's of the same name, or not ours at all: never touched.
        raise Conflict(f"Deployment {serving_name(name)} is not owned by this object")
    generation = body["metadata"].get("generation")

    if model.spec.deployment is None:
        if deployment is not None:
            rt.kube.delete_serving(namespace, serving_name(name))
            log.info("%s/%s: spec.deployment removed; deleted Deployment and Service", *key)
        write_status(
            rt, key, lambda cur, _b: serving.without_deployment(cur, generation, status.now()), body
        )
        return

    spec_hash = model.spec.spec_hash()
    decided: list[tuple[CompressedModelStatus, serving.Plan]] = []

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj:
        p = serving.plan(cur, spec_hash, state)
        decided[:] = [(cur, p)]
        return serving.apply_plan(cur, generation, p, status.now())

    new = write_status(rt, key, compute, body)
    if new is None:
        return
    old, p = decided[0]
    for event in serving.events_for(old, p):
        _post_event(rt, body, event)
    # Again on the written status: a rollback just recorded now targets the last good.
    p = serving.plan(status.parse(new), spec_hash, state)
    if p.target is None:
        return
    manifest = serving.build_deployment(model, p.target, rt.settings)
    wanted = manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    if deployment is not None and state.applied_hash == wanted:
        return
    rt.kube.apply_deployment(manifest)
    rt.kube.apply_service(serving.build_service(model))
    log.info(
        "%s/%s: Deployment %s runs artifact %s",
        *key,
        manifest["metadata"]["name"],
        p.target.sha256[:12],
    )


# ------------------------------------------------------------------ deletion


@contextlib.contextmanager
def storage_credentials(rt: Runtime, model: CompressedModel) -> Iterator[None]:
    """S3 credentials from the Secret the spec names, for this call only."""
    secret = model.spec.source.credentials_secret
    if not secret:
        yield
        return
    data = rt.kube.read_secret(model.metadata.namespace or "", secret)
    if data is None:
        raise BadInput(f"Secret {secret} (spec.source.credentialsSecret) not found")
    env = {k: v for k, v in data.items() if k.startswith("AWS_")}
    with storage.credentials(env):
        yield


def cleanup_artifacts(rt: Runtime, body: Obj) -> int:
    """Deletes `<output>/<name>/` from storage; returns how many objects went."""
    model = parse_model(body)
    if model.spec.output is None:
        return 0
    prefix = storage.join(model.spec.output.uri, model.metadata.name)
    with storage_credentials(rt, model):
        count = storage.delete_prefix(prefix)
    log.info("%s/%s: deleted %d artifact objects under %s", *_key(body), count, prefix)
    return count
