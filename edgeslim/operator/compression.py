"""The compression side: an object's spec gets its compressor Job (queued for a
slot when the operator limits them), and a finished Job's result goes into status.

`reconcile_model` runs for create, spec change and resume; `job_changed` for
every Job event; `resync` as the periodic safety net. A result that passes the
gate with `spec.deployment` set hands over to `rollout`.
"""

from __future__ import annotations

import logging

from edgeslim import metrics, storage
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.operator import (
    fanout,
    jobs,
    kueue,
    ownership,
    results,
    source_watch,
    status,
    targets,
    variants,
)
from edgeslim.operator.kube import Conflict, api_message
from edgeslim.operator.names import job_name
from edgeslim.operator.policy_hooks import (
    policy_groups,
    policy_limited,
    queued_message,
    record_policy_ref,
)
from edgeslim.operator.queue import ModelKey, Waiting
from edgeslim.operator.rest import ApiError
from edgeslim.operator.rollout import reconcile_serving, serve_quietly
from edgeslim.operator.runtime import (
    InvalidSpec,
    Obj,
    Runtime,
    get_model,
    holding_jobs,
    model_key,
    parse_model,
    queued_models,
    snapshot,
    storage_credentials,
    unrecorded_results,
    variant_body,
    write_status,
)
from edgeslim.operator.status import COMPRESSED_PHASES, Transition

log = logging.getLogger("edgeslim.operator")

MANIFEST_MAX_BYTES = 1024 * 1024


# ------------------------------------------------------------ the model side


def fail_invalid(rt: Runtime, body: Obj, message: str) -> None:
    """Phase Failed / InvalidSpec for whatever the spec currently is."""

    def compute(cur: CompressedModelStatus, _b: Obj) -> Transition:
        return Transition(Phase.failed, "InvalidSpec", message)

    body = record_policy_ref(rt, model_key(body), body)  # a policy may be why
    write_status(rt, model_key(body), compute, body)
    rt.slots.forget(model_key(body))


def fail_reconcile(rt: Runtime, body: Obj, message: str) -> None:
    """Phase Failed / ReconcileError once the retries are spent (best effort:
    the API may be what is failing)."""
    try:
        write_status(
            rt, model_key(body), lambda _c, _b: Transition(Phase.failed, "ReconcileError", message)
        )
    except Exception as exc:
        log.warning("%s/%s: could not record the failure: %s", *model_key(body), exc)


def reconcile_model(rt: Runtime, body: Obj) -> None:
    """Create, spec change and resume: make sure the current spec gets (or has) its Job.

    With spec.targets each target goes through the same steps as a variant (its
    own key, effective spec and status entry, see `variants`)."""
    model = parse_model(body)  # InvalidSpec propagates; the handler records it
    had_targets = bool(variants.status_entries(body.get("status")))
    targets.retire(rt, body, model)
    if not model.spec.targets:
        if had_targets:  # they were all removed: the object is itself again
            body = rt.kube.get_model(*model_key(body)) or body
        _reconcile_one(rt, body)
        return
    for t in model.spec.targets:
        variant = variant_body(body, t.name)
        if variant is not None:
            _reconcile_one(rt, variant)


def _reconcile_one(rt: Runtime, body: Obj) -> None:
    key = model_key(body)
    body = record_policy_ref(rt, key, body)
    model = parse_model(body)  # InvalidSpec propagates; the handler records it
    spec_hash = model.spec.spec_hash()
    current = status.parse(body.get("status"))
    # A re-compression of this spec (source replaced, new compressor) has its own Job.
    revision = source_watch.pending_revision(current, spec_hash)
    job = job_name(model.metadata.name, spec_hash, revision)
    _supersede(rt, key, spec_hash, model.metadata.uid)

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
    if current.spec_hash == spec_hash and (
        current.phase == Phase.compressing or _holds_job(rt, key, spec_hash, model.metadata.uid)
    ):
        # Resumed after a restart: the Job exists (adopted on 409) or is made again.
        # Under Kueue a Queued object may have its Job already, suspended: it has its
        # policy slot, and its status must keep saying it waits for Kueue.
        start(rt, key, Waiting(body["metadata"].get("creationTimestamp", ""), *key, job), body)
        return
    # A CompressionPolicy's maxConcurrent queues its models even with no overall
    # limit (under Kueue there is none: Kueue's quota is the overall limit).
    if rt.slots.unlimited and not policy_limited(rt, key):
        start(rt, key, Waiting(body["metadata"].get("creationTimestamp", ""), *key, job), body)
        return

    entry = Waiting(body["metadata"].get("creationTimestamp", ""), key[0], key[1], job)
    rt.slots.wait(entry)
    admitted = rt.slots.take(queued_models(rt.models_index), holding(rt), policy_groups(rt))
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
    limit = rt.slots.limit  # 0 under Kueue: only a policy can hold an object here

    def compute(cur: CompressedModelStatus, _b: Obj) -> Transition | None:
        if cur.spec_hash == spec_hash and cur.phase in (Phase.compressing, *COMPRESSED_PHASES):
            return None  # a dispatcher started it meanwhile
        if kueue.is_waiting(cur, spec_hash):
            return None  # started meanwhile too: its Job waits for Kueue
        return Transition(
            Phase.queued,
            "Queued",
            queued_message(rt, key, limit),
            spec_hash=spec_hash,
            job_name=job,
        )

    write_status(rt, key, compute, body)


def _supersede(rt: Runtime, key: ModelKey, spec_hash: str, uid: str | None) -> None:
    """Deletes this object's Jobs of older specs: their result would describe a
    spec that is gone. A Job that merely carries the label is not ours to delete."""
    for k, entries in snapshot(rt.jobs_index):
        if k != key:
            continue
        for e in entries:
            if e.spec_hash != spec_hash and e.owner_uid == uid:
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
            body = get_model(rt, key)
            if body is None:
                rt.slots.forget(key)
                return
        try:
            model = parse_model(body)
        except InvalidSpec as exc:
            fail_invalid(rt, body, str(exc))
            return
        spec_hash = model.spec.spec_hash()
        revision = source_watch.pending_revision(status.parse(body.get("status")), spec_hash)
        job = job_name(model.metadata.name, spec_hash, revision)
        if entry.job and entry.job != job:
            rt.slots.release(key, entry.job)  # the spec changed while it waited
            return
        queue = rt.settings.kueue_queue

        def compute(cur: CompressedModelStatus, b: Obj) -> Transition | Obj | None:
            if cur.spec_hash == spec_hash and cur.phase in COMPRESSED_PHASES:
                return None
            if queue:
                # Admitted already (a resume): the status stays, the Jobs are made.
                return kueue.waiting(cur, spec_hash, job, queue) or dict(b.get("status") or {})
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
        if job in _known_jobs(rt, key, model.metadata.uid):
            # Already created (this is a re-run or a resume): the live index
            # says so without a 409 round-trip.
            log.info("%s/%s: adopted existing Job %s", *key, job)
            return
        # A search fans out (plan, candidates, then this Job); a target's searches alone.
        # A re-compression searches in its one Job: the fan-out's steps are named per spec.
        if fanout.applies(model) and not model.spec.targets and revision is None:
            plan = fanout.step_job_name(model.metadata.name, spec_hash, fanout.PLAN)
            rt.slots.hand_over(key, entry.job, plan)
            fanout.advance(rt, key)
            return
        manifest = jobs.build_job(model, rt.settings, spec_hash)
        manifest["metadata"]["name"] = job  # with a re-compression's revision
        try:
            created = rt.kube.create_job(manifest)
        except ApiError as exc:
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
    except ownership.NameConflict as exc:
        # Someone else's Job holds the name: Failed (no retry until the spec
        # changes), and the slot is free again.
        conflict = Transition(
            Phase.failed, ownership.REASON, str(exc), spec_hash=spec_hash, job_name=job
        )
        write_status(rt, key, lambda _c, _b: conflict)
        rt.slots.forget(key)
    except BaseException:
        rt.slots.release(key, entry.job)
        raise


def _holds_job(rt: Runtime, key: ModelKey, spec_hash: str, uid: str | None) -> bool:
    """True when one of the object's own Jobs of this spec is unfinished (for a
    search, any of its steps): it holds its slot already."""
    return any(
        e.state in jobs.UNFINISHED for e in fanout.own_jobs(rt, key, spec_hash, uid).values()
    )


def _known_jobs(rt: Runtime, key: ModelKey, uid: str | None) -> set[str]:
    """Names of the object's own Jobs (by owner uid) the Job watch has seen (any state)."""
    return {
        e.name
        for k, entries in snapshot(rt.jobs_index)
        if k == key
        for e in entries
        if e.owner_uid == uid
    }


def _adopt(rt: Runtime, key: ModelKey, job: str, model: CompressedModel) -> None:
    existing = rt.kube.read_job(key[0], job)
    if existing is None:
        raise Conflict(f"Job {job} existed a moment ago and is gone; retrying")
    # Ours: adopt. A deleted object's of the same name: a transient Conflict
    # until the garbage collector takes it. Anyone else's: NameConflict.
    found = ownership.claim(existing, "Job", job, model.metadata.name, model.metadata.uid or "")
    ownership.require(found, key[0])
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
    """Fills free slots: searches under way first, then the oldest queued objects."""
    for key in fanout.in_progress(rt):
        fanout.advance_quietly(rt, key)
    # Under Kueue the slots are unlimited: only policies' maxConcurrent hold objects here.
    groups = policy_groups(rt)
    if rt.slots.unlimited and not groups:
        return
    # holding() lists the searches again: advancing one may just have finished it.
    for w in rt.slots.take(queued_models(rt.models_index), holding(rt), groups):
        _start_quietly(rt, w)


def holding(rt: Runtime) -> dict[ModelKey, set[str]]:
    """Unfinished Jobs per object (`holding_jobs`), and the objects between two steps
    of an optimize search with none: a search holds its CompressionPolicy place from
    its plan to its pick, or a second model of the policy could start in that gap."""
    held = holding_jobs(rt.jobs_index)
    for key in fanout.in_progress(rt):
        held.setdefault(key, set())
    return held


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
    key = ref.key
    if event_type == "DELETED":
        rt.slots.release(key, ref.name)
        dispatch(rt)
        return
    state = jobs.job_state(body)
    if state in (jobs.JobState.succeeded, jobs.JobState.failed) and fanout.is_step(body):
        rt.slots.release(key, ref.name)
        try:  # a search step's result is in storage: the search goes on
            fanout.advance(rt, key)
        finally:
            dispatch(rt)
    elif state in (jobs.JobState.succeeded, jobs.JobState.failed):
        rt.slots.release(key, ref.name)
        try:
            record_result(rt, body)
        finally:
            dispatch(rt)
    elif state is jobs.JobState.running and rt.settings.kueue_queue:
        step = fanout.is_step(body)
        write_status(rt, key, lambda cur, _b: kueue.admitted(cur, ref.name, ref.spec_hash, step))


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
    key = ref.key
    if _already_recorded(rt, key, ref.name):
        return
    body = get_model(rt, key)
    if body is None or body["metadata"].get("uid") != ref.owner_uid:
        return  # the object is gone (or replaced): the garbage collector takes the Job
    try:
        model = parse_model(body)
    except InvalidSpec:
        return  # the model handler reports this
    if model.spec.spec_hash() != ref.spec_hash:
        return  # superseded: the model handler deletes it
    if source_watch.superseded(status.parse(body.get("status")), ref.name, ref.spec_hash):
        return  # an earlier Job of this spec: a re-compression took its place
    state = jobs.job_state(job_body)
    pods = rt.kube.list_pods(ref.namespace, jobs.pod_selector(ref.uid))
    terms = jobs.terminations(pods, ref.uid)
    out = results.outcome(state, jobs.failure_reason(job_body), terms, ref, model)
    deploy = out.phase is Phase.ready and model.spec.deployment is not None
    result = out.result
    if result is not None and not result.complete and result.manifest_uri:
        try:
            result = _with_manifest(rt, model, result, ref)
        except results.UntrustedResult as exc:
            out, result = results.Outcome(Phase.failed, "UntrustedResult", str(exc)), None
            deploy = False
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
        if source_watch.superseded(cur, ref.name, ref.spec_hash):
            return None
        limit = model.spec.history_limit
        return source_watch.with_lineage(transition, cur, ref.name, ref.spec_hash, result, limit)

    if write_status(rt, key, compute, body) is not None:
        metrics.compressions_finished.labels(result=out.metric_result).inc()
        seconds = jobs.duration_seconds(job_body)
        if seconds is not None:
            metrics.compression_duration.observe(seconds)
        log.info("%s/%s: Job %s finished: %s (%s)", *key, ref.name, out.phase.value, out.reason)
        if deploy:
            serve_quietly(rt, key)


def _with_manifest(
    rt: Runtime, model: CompressedModel, result: results.TerminationMessage, ref: jobs.JobRef
) -> results.TerminationMessage:
    """A short termination message names the manifest; read the figures from it.

    A manifest that cannot be read leaves the short result as it is (the
    figures stay unknown); one that fails verification raises UntrustedResult.
    """
    try:
        with storage_credentials(rt, model):
            raw = storage.read_bytes(
                result.manifest_uri or "", max_bytes=MANIFEST_MAX_BYTES, what="manifest"
            )
    except (BadInput, StorageUnavailable) as exc:
        log.warning("%s: manifest %s not read: %s", model.metadata.name, result.manifest_uri, exc)
        return result
    return results.merge_manifest(result, raw, ref, model)


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
            serve_quietly(rt, key)
