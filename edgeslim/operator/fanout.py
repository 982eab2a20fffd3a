"""spec.optimize in the cluster: the search fanned out as Jobs, within the Job limit or Kueue.

    plan Job        `<name>-<hash>-plan`   compress --plan: its termination message gives N
    candidate Jobs  `<name>-<hash>-c<i>`   compress --candidate i, as many at once as slots allow
    pick Job        the object's own Job   compress --pick, once every candidate Job has ended;
                                           its result is recorded like any compressor Job's

Nothing is kept in memory: which step comes next follows from the object's
Jobs (the kopf index) and `status.candidates`, so `advance` can run after any
event, from the resync, or after an operator restart, and only creates what
is missing. A candidate Job that ran before finds its result in storage and
ends at once. Every Job is owned by the object and labelled with its spec
hash: a deleted object's Jobs go with it, and a new spec deletes the old ones
(`compression._supersede`).

Under Kueue (EDGESLIM_KUEUE_QUEUE) the steps are the same, but every Job a step
needs is created at once, suspended with the queue label (`kueue.queued`), and
Kueue's quota alone decides how many candidates run: the operator's Job limit
would only hold back Jobs Kueue could admit (its slots are unlimited then). The
object is Queued until Kueue admits the plan Job, then Compressing.
"""

from __future__ import annotations

import copy
import json
import logging

from edgeslim import metrics
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase
from edgeslim.operator import jobs, status
from edgeslim.operator.names import STEP_LABEL, _digest, job_name
from edgeslim.operator.runtime import (
    InvalidSpec,
    JobEntry,
    Obj,
    Runtime,
    holding_jobs,
    parse_model,
    snapshot,
    write_status,
)
from edgeslim.operator.settings import Settings

log = logging.getLogger("edgeslim.operator")

PLAN, CANDIDATE = "plan", "candidate"
FINISHED = (jobs.JobState.succeeded, jobs.JobState.failed)
# The plan is bounded by maxCandidates (at most 1000, spec.py); a bigger number
# in a termination message is not one our compressor wrote.
MAX_PLANNED = 1000
# Model names kept whole in a step Job's name; longer ones are cut and a digest
# of the whole name and spec hash keeps them apart.
STEP_NAME_KEEPS = 40


def applies(model: CompressedModel) -> bool:
    return model.spec.optimize is not None


def searching(current: CompressedModelStatus, settings: Settings) -> bool:
    """The search may take its next step: Compressing, or under Kueue also Queued
    (its plan Job waits for admission; without Kueue, Queued waits for a slot)."""
    if current.phase == Phase.compressing:
        return True
    return bool(settings.kueue_queue) and current.phase == Phase.queued


def step_job_name(model_name: str, spec_hash: str, step: str) -> str:
    """`<name>-<hash[:10]>-<step>` (step `plan` or `c<i>`), 56 characters at most."""
    if len(model_name) <= STEP_NAME_KEEPS:
        return f"{model_name}-{spec_hash[:10]}-{step}"
    return f"{model_name[:30]}-{_digest(model_name, spec_hash)}-{step}"


def is_step(job: Obj) -> bool:
    """A plan or candidate Job (not the object's result Job)."""
    return bool(((job.get("metadata") or {}).get("labels") or {}).get(STEP_LABEL))


def candidate_step(index: int) -> str:
    return f"c{index}"


def build_step_job(
    model: CompressedModel, settings: Settings, spec_hash: str, step: str, args: list[str]
) -> Obj:
    """The object's compressor Job, renamed and labelled as one step, running `args`."""
    job = copy.deepcopy(jobs.build_job(model, settings, spec_hash))
    kind = PLAN if step == PLAN else CANDIDATE
    job["metadata"]["name"] = step_job_name(model.metadata.name, spec_hash, step)
    job["metadata"]["labels"][STEP_LABEL] = kind
    job["spec"]["template"]["metadata"]["labels"][STEP_LABEL] = kind
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[-1] == "--pick", command  # build_job's command for an optimize spec
    container["command"] = [*command[:-1], *args]
    return job


def planned_from_message(message: str) -> int | None:
    """N from a plan pod's termination message; None when it is not a plan's message."""
    try:
        doc = json.loads(message)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") != "OptimizePlan":
        return None
    n = doc.get("candidates")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_PLANNED:
        return None
    return n


def progress_text(finished: int, planned: int) -> str:
    return f"{finished}/{planned}"


def planned_from_status(current: CompressedModelStatus) -> int | None:
    text = current.candidates or ""
    done, _, total = text.partition("/")
    return int(total) if done.isdigit() and total.isdigit() else None


def own_jobs(
    rt: Runtime, key: tuple[str, str], spec_hash: str, uid: str | None
) -> dict[str, JobEntry]:
    """The object's own Jobs of this spec (by owner uid), any step, any state."""
    return {
        e.name: e
        for k, entries in snapshot(rt.jobs_index)
        if k == key
        for e in entries
        if e.spec_hash == spec_hash and e.owner_uid == uid
    }


def in_progress(rt: Runtime) -> list[tuple[str, str]]:
    """Objects whose search has step Jobs but no pick Job yet: they may be waiting for a slot."""
    models = {k: es[0] for k, es in snapshot(rt.models_index) if es}
    found = []
    for key, entries in snapshot(rt.jobs_index):
        m = models.get(key)
        if m is None or m.phase != Phase.compressing:
            continue
        current = [e for e in entries if e.spec_hash == m.spec_hash]
        if any(e.step for e in current) and not any(e.name == m.job_name for e in current):
            found.append(key)
    return found


def advance(rt: Runtime, key: tuple[str, str]) -> None:
    """Create whatever the object's search needs next, within the free slots."""
    body = rt.kube.get_model(*key)
    if body is None:
        return
    try:
        model = parse_model(body)
    except InvalidSpec:
        return  # the model handler reports it
    if not applies(model):
        return
    spec_hash = model.spec.spec_hash()
    current = status.parse(body.get("status"))
    if current.spec_hash != spec_hash or not searching(current, rt.settings):
        return
    name, uid = model.metadata.name, model.metadata.uid
    final = job_name(name, spec_hash)
    mine = own_jobs(rt, key, spec_hash, uid)
    if final in mine:
        return  # the pick Job runs or ran: compression.record_result takes its result
    plan = step_job_name(name, spec_hash, PLAN)
    if plan not in mine:
        _set_progress(rt, key, body, spec_hash, None)  # a new search: no stale count
        if _slots(rt, key, [plan]) and _create(
            rt, key, build_step_job(model, rt.settings, spec_hash, PLAN, ["--plan"])
        ):
            metrics.compressions_started.inc()  # one per search, as for one Job
        return
    if mine[plan].state not in FINISHED:
        return
    planned = planned_from_status(current)
    if planned is None:
        planned = _planned_from_pod(rt, key, plan, mine[plan])
    names = [step_job_name(name, spec_hash, candidate_step(i)) for i in range(planned)]
    finished = sum(1 for n in names if n in mine and mine[n].state in FINISHED)
    _set_progress(rt, key, body, spec_hash, progress_text(finished, planned))
    missing = [n for n in names if n not in mine]
    if missing:
        for n in _slots(rt, key, missing):
            i = names.index(n)
            args = ["--candidate", str(i)]
            _create(rt, key, build_step_job(model, rt.settings, spec_hash, candidate_step(i), args))
        return
    if finished < planned:
        return
    # Every candidate Job has ended (a failed one is evaluated again by the pick).
    if _slots(rt, key, [final]):
        _create(rt, key, jobs.build_job(model, rt.settings, spec_hash))


def _slots(rt: Runtime, key: tuple[str, str], wanted: list[str]) -> list[str]:
    # Under Kueue the slots are unlimited: all of them, created suspended, and Kueue
    # admits what its quota allows; the reservation keeps the object's policy slot
    # held until the index shows the new Jobs.
    return rt.slots.take_steps(key, wanted, holding_jobs(rt.jobs_index))


def _create(rt: Runtime, key: tuple[str, str], manifest: Obj) -> bool:
    """Creates the Job; False when it exists already."""
    job = manifest["metadata"]["name"]
    try:
        created = rt.kube.create_job(manifest)
    except BaseException:
        rt.slots.release(key, job)
        raise
    if created is None:
        # Created a moment ago by a concurrent advance: the reservation stays until
        # the index shows it running (or its end releases it), as for that creator.
        log.info("%s/%s: search Job %s exists already", *key, job)
        return False
    log.info("%s/%s: created search Job %s", *key, job)
    return True


def _planned_from_pod(rt: Runtime, key: tuple[str, str], plan: str, entry: JobEntry) -> int:
    """The plan's size from its pod; 0 when the plan failed (the pick then searches alone)."""
    if entry.state is not jobs.JobState.succeeded:
        return 0
    body = rt.kube.read_job(key[0], plan)
    if body is None:
        return 0
    uid = jobs.JobRef.of(body).uid
    for term in reversed(jobs.terminations(rt.kube.list_pods(key[0], jobs.pod_selector(uid)), uid)):
        if term.exit_code == 0 and (n := planned_from_message(term.message)) is not None:
            return n
    log.warning("%s/%s: plan Job %s left no plan size; the pick searches alone", *key, plan)
    return 0


def _set_progress(
    rt: Runtime, key: tuple[str, str], body: Obj, spec_hash: str, text: str | None
) -> None:
    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj | None:
        if cur.spec_hash != spec_hash or not searching(cur, rt.settings):
            return None
        if cur.candidates == text:
            return None
        return cur.model_copy(update={"candidates": text}).wire()

    write_status(rt, key, compute, body)


def advance_quietly(rt: Runtime, key: tuple[str, str]) -> None:
    """advance from another object's event: a failure waits for the next event or the resync."""
    try:
        advance(rt, key)
    except Exception as exc:
        log.warning("%s/%s: search not advanced yet: %s", *key, exc)
