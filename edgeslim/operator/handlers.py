"""kopf handlers: decorators only, each delegating in a line or two to `compression`
(model and Job side), `rollout` (serving), `cleanup` (deletion) or `runtime`.

Why Job *events* (not timers or daemons) tell the operator a compression
ended: the watch already streams every Job change, so a finished Job costs no
polling and the result is recorded within a watch round-trip; timers would
cost one API call per object per interval (1,000 objects -> hundreds of
requests a minute for nothing). `on.event` handlers are not retried by kopf,
so a periodic resync (`resync_loop`) re-reads any finished Job whose result is
missing from its object -- cheap, because it looks at the in-memory indexes
first and calls the API only for the gaps.

Serving Deployments are watched the same way: their status is where the
Deployment controller reports rollout progress and ProgressDeadlineExceeded,
so each change drives `rollout.reconcile_serving` (status, rollback); the
resync re-runs it for objects still Deploying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from edgeslim import metrics
from edgeslim.api.policy import POLICY_PLURAL
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.operator import (
    canary,
    cleanup,
    compression,
    jobs,
    rollout,
    runtime,
    server,
    source_watch,
    variants,
)
from edgeslim.operator.kube import Kube, is_transient
from edgeslim.operator.names import (
    API_GROUP,
    API_VERSION,
    CLEANUP_ANNOTATION,
    FINALIZER,
    MODEL_LABEL,
    PLURAL,
    TARGET_LABEL,
)
from edgeslim.operator.policy import policy_entry
from edgeslim.operator.policy_sync import model_seen, policy_changed
from edgeslim.operator.policy_sync import resync as resync_policies
from edgeslim.operator.queue import Slots
from edgeslim.operator.settings import Settings

MODELS = (API_GROUP, API_VERSION, PLURAL)
POLICIES = (API_GROUP, API_VERSION, POLICY_PLURAL)
JOBS = ("batch", "v1", "jobs")
DEPLOYMENTS = ("apps", "v1", "deployments")
OURS = {MODEL_LABEL: kopf.PRESENT}
RETRIES = 6
RESYNC_SECONDS = 15.0
log = logging.getLogger("edgeslim.operator")


def backoff(retry: int) -> float:
    """1, 2, 4, 8, 16, 32 s: quick for a blip, patient for an outage."""
    return float(min(2**retry, 60))


def _transient(
    handler: str, exc: BaseException, retry: int
) -> kopf.PermanentError | kopf.TemporaryError:
    metrics.reconcile_errors.labels(handler=handler).inc()
    message = f"{type(exc).__name__}: {exc}"
    if retry + 1 >= RETRIES:
        return kopf.PermanentError(f"gave up after {RETRIES} attempts: {message}")
    return kopf.TemporaryError(message, delay=backoff(retry))


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    model_index: kopf.Index,
    job_index: kopf.Index,
    source_index: kopf.Index,
    policy_index: kopf.Index,
    serving_index: kopf.Index,
    **_: Any,
) -> None:
    # Our own group on everything kopf writes, so it reads as ours in kubectl.
    settings.persistence.finalizer = FINALIZER
    # Annotations, not status.kopf: status is ours, schema-checked, and GitOps
    # tools diff it; kopf's bookkeeping has no place there.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # After its own patch kopf waits for the watch to echo that version before
    # handling the object again; under load (1,000 objects at once) the echo
    # can take longer than the default 5 s, and a stale event would re-run the
    # creation handler for nothing.
    settings.persistence.consistency_timeout = 60
    # Load balancers and API-server restarts can leave a watch connected but
    # silent; restart any watch that has said nothing for this long.
    settings.watching.inactivity_timeout = 300
    settings.watching.server_timeout = 240
    # kopf would post every handler's INFO log as an Event; we post one Event
    # per phase transition ourselves, so only kopf's warnings and errors go out.
    settings.posting.level = logging.WARNING
    # One replica (the chart uses strategy Recreate): no peering objects, no peering RBAC.
    settings.peering.standalone = True
    # Sync handlers run here; enough threads that 1,000 objects don't queue behind 4.
    settings.execution.max_workers = 16

    cfg = Settings.from_env()
    rt = runtime.Runtime(
        settings=cfg,
        kube=Kube.connect(),
        # Under Kueue its quota is the overall limit (ours would only hold back Jobs
        # Kueue could admit); the slots then apply policies' maxConcurrent alone.
        slots=Slots(0 if cfg.kueue_queue else cfg.max_concurrent_jobs),
        models_index=model_index,
        jobs_index=job_index,
        policies_index=policy_index,
        serving_index=serving_index,
    )
    metrics.watch_queue(rt.running_count, rt.queued_count)
    runtime.use_policies(policy_index)
    memo.runtime = rt
    memo.http = await server.serve(lambda: rt.ready, cfg.metrics_port)
    memo.resync = asyncio.create_task(resync_loop(rt))
    # Sources replaced in storage: checked on their own clock, from an index (no polling
    # of the API for objects that are not due).
    memo.source_watch = asyncio.create_task(source_watch.loop(rt, source_index))
    # Running canaries are analysed on their own clock (operator/canary.py).
    memo.canary = asyncio.create_task(canary_loop(rt))
    # kopf starts its watches as soon as startup handlers return.
    rt.ready = True


async def resync_loop(rt: runtime.Runtime) -> None:
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        try:
            await asyncio.to_thread(compression.resync, rt)
            await asyncio.to_thread(resync_policies, rt)
        except Exception as exc:
            metrics.reconcile_errors.labels(handler="resync").inc()
            log.warning("resync failed: %s", exc)


async def canary_loop(rt: runtime.Runtime) -> None:
    """Reconciles the serving side of objects with a running canary every
    canary.TICK_SECONDS; each decides for itself whether its interval is up."""
    while True:
        await asyncio.sleep(canary.TICK_SECONDS)
        for key in list(canary.ACTIVE):
            await asyncio.to_thread(rollout.serve_quietly, rt, key)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    memo.canary.cancel()
    await source_watch.stop(memo.source_watch)
    memo.resync.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await memo.resync
    await memo.http.cleanup()


# Indexes: kopf fills them from a full list before any handler runs, so after a
# restart the queue and the running-Job count come from the cluster, not memory.
@kopf.index(*MODELS)
def model_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    # With spec.targets: one entry per target, under its variant key (see `variants`).
    return runtime.model_entries(namespace, name, dict(body))


@kopf.index(*MODELS)
def source_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): source_watch.source_entry(dict(body))}


@kopf.index(*JOBS, labels=OURS)
def job_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    key = variants.variant_key(namespace, labels[MODEL_LABEL], labels.get(TARGET_LABEL, ""))
    return {key: runtime.job_entry(dict(body))}


@kopf.index(*DEPLOYMENTS, labels=OURS)
def serving_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    # By object, not by target: what targets.retire looks through for those the
    # spec no longer names (the status may have lost their entries first).
    return {(namespace, labels[MODEL_LABEL]): runtime.serving_entry(dict(body))}


@kopf.on.resume(*MODELS, retries=RETRIES)
@kopf.on.create(*MODELS, retries=RETRIES)
@kopf.on.update(*MODELS, field="spec", retries=RETRIES)
# Labels decide which CompressionPolicy selects the object, hence its effective spec.
@kopf.on.update(*MODELS, field="metadata.labels", retries=RETRIES)
def reconcile_model(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    rt: runtime.Runtime = memo.runtime
    try:
        compression.reconcile_model(rt, dict(body))
    except runtime.InvalidSpec as exc:
        compression.fail_invalid(rt, dict(body), str(exc))
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    except Exception as exc:
        if not is_transient(exc):
            metrics.reconcile_errors.labels(handler="reconcile").inc()
            raise
        error = _transient("reconcile", exc, retry)
        if isinstance(error, kopf.PermanentError):
            compression.fail_reconcile(rt, dict(body), str(error))
        raise error from exc


@kopf.on.event(*MODELS)
async def model_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # Async: memory-only work (metrics, a policy recount timer; short in-memory locks),
    # so every model event need not queue for one of the 16 handler threads.
    if type == "DELETED":
        compression.forget_model(
            memo.runtime, body["metadata"]["namespace"], body["metadata"]["name"]
        )
    else:
        compression.observe_model(memo.runtime, dict(body))
    # The index already has the change: recount the policies it may count towards.
    model_seen(memo.runtime, dict(body))


@kopf.index(*POLICIES)
def policy_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): policy_entry(dict(body))}


@kopf.on.event(*POLICIES)
def policy_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        policy_changed(memo.runtime, type, dict(body))
    except Exception as exc:
        # Not retried by kopf: the resync reconciles models left on an old generation.
        metrics.reconcile_errors.labels(handler="policy").inc()
        log.warning(
            "CompressionPolicy %s: %s (the resync will retry)", body["metadata"]["name"], exc
        )


def job_has_work(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """Only a deleted or finished Job (or, with Kueue, an admitted one) has anything
    for `job_changed`: the rest of a Job's events (created, pod started, status
    counts) are dropped on the event loop instead of each queuing for a handler
    thread while kopf holds its body (1,000 Jobs: thousands of events)."""
    state = jobs.job_state(dict(body))
    if type == "DELETED" or state in (jobs.JobState.succeeded, jobs.JobState.failed):
        return True
    return state is jobs.JobState.running and bool(memo.runtime.settings.kueue_queue)


# Finished Jobs have threads of their own. On kopf's shared pool (16 threads) their
# events queued behind creation handlers: with 1,000 objects created at once all
# 16 threads ran creation handlers for ~70 s (py-spy), each mostly waiting on the
# API server, and objects whose Jobs finished meanwhile were final 60-90 s later.
# A finished Job is what frees a slot for the next queued object, so it must not
# wait behind objects that can only queue. As many as kopf's: with 4, a policy
# wave (Jobs finishing ~3 a second, each result a few API calls) waited on them
# (lag max 4 -> 63 s in the same bench).
JOB_THREADS = 16
_job_lane = ThreadPoolExecutor(JOB_THREADS, thread_name_prefix="job-event")


@kopf.on.event(*JOBS, labels=OURS, when=job_has_work)
async def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(
            _job_lane, compression.job_changed, memo.runtime, type, dict(body)
        )
    except Exception as exc:
        # Not retried by kopf: the resync loop picks the Job up again.
        metrics.reconcile_errors.labels(handler="job").inc()
        log.warning("Job %s: %s (the resync will retry)", body["metadata"]["name"], exc)


@kopf.on.event(*DEPLOYMENTS, labels=OURS)
def deployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # The Deployment controller reports rollout progress (and
    # ProgressDeadlineExceeded) in the Deployment's status: its watch is the
    # signal to update the model's status and to roll back.
    try:
        rollout.deployment_changed(memo.runtime, type, dict(body))
    except Exception as exc:
        # Not retried by kopf: the next Deployment event or the resync retries.
        metrics.reconcile_errors.labels(handler="serving").inc()
        log.warning("Deployment %s: %s", body["metadata"]["name"], exc)


@kopf.on.delete(*MODELS, annotations={CLEANUP_ANNOTATION: "true"}, retries=RETRIES)
def cleanup_artifacts(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    try:
        cleanup.cleanup_artifacts(memo.runtime, dict(body))
    except (runtime.InvalidSpec, BadInput) as exc:
        # Never block deletion forever on what cannot be fixed (e.g. the Secret is gone).
        metrics.reconcile_errors.labels(handler="cleanup").inc()
        raise kopf.PermanentError(f"artifacts not deleted: {exc}") from exc
    except (StorageUnavailable, Exception) as exc:
        if isinstance(exc, StorageUnavailable) or is_transient(exc):
            raise _transient("cleanup", exc, retry) from exc
        metrics.reconcile_errors.labels(handler="cleanup").inc()
        raise
