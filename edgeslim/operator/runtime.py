"""What every handler shares: the index entries, the `Runtime`, status writes.

Every status write is a read-compute-write with the object's resourceVersion
as precondition, so the three writers (the model handler, the Job watcher and
the queue dispatcher) never overwrite each other with stale state: on 409 the
writer re-reads and recomputes, and a computation that no longer applies
(another spec hash by now) writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from edgeslim import metrics, storage
from edgeslim.api.errors import format_validation_error
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase
from edgeslim.errors import BadInput
from edgeslim.operator import events, jobs, policy, status, variants
from edgeslim.operator.kube import Conflict, Kube
from edgeslim.operator.names import STEP_LABEL, TARGET_LABEL
from edgeslim.operator.queue import ModelKey, Slots, Waiting
from edgeslim.operator.settings import Settings
from edgeslim.operator.status import COMPRESSED_PHASES, Transition
from edgeslim.redact import redact_messages

Obj = dict[str, Any]
log = logging.getLogger("edgeslim.operator")

STATUS_WRITE_ATTEMPTS = 5


class InvalidSpec(Exception):
    """The object can never work as written: phase Failed, reason InvalidSpec, no retry."""


# ------------------------------------------------------------- index entries


@dataclass(frozen=True, slots=True)  # slots: 1,000s of these live in the indexes
class ModelEntry:
    """What the queue and the Job watcher need to know about a CompressedModel."""

    created: str
    phase: str | None
    spec_hash: str | None
    job_name: str | None
    generation: int | None
    observed_generation: int | None
    # For CompressionPolicies: which policy selects it (labels) and which
    # generation of it the status reflects (status.policy).
    labels: tuple[tuple[str, str], ...] = ()
    policy: str | None = None
    policy_generation: int | None = None


@dataclass(frozen=True, slots=True)
class JobEntry:
    name: str
    spec_hash: str
    state: jobs.JobState
    owner_uid: str | None = None  # its controller's uid: only the owner may adopt or delete it
    step: str = ""  # an optimize search's plan or candidate Job; "" for the result's Job


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
        labels=tuple(sorted((meta.get("labels") or {}).items())),
        policy=(raw.get("policy") or {}).get("name"),
        policy_generation=(raw.get("policy") or {}).get("generation"),
    )


def model_entries(namespace: str, name: str, body: Obj) -> dict[ModelKey, ModelEntry]:
    """The model index's entries of an object: its own, or with spec.targets one per
    target under its variant key (see `variants`) and none of its own."""
    targets = variants.spec_target_names(body)
    if not targets:
        return {(namespace, name): model_entry(body)}
    meta = body.get("metadata") or {}
    own = model_entry(body)  # the object-wide fields: labels, status.policy
    return {
        variants.variant_key(namespace, name, e["name"]): ModelEntry(
            created=meta.get("creationTimestamp") or "",
            phase=e.get("phase"),
            spec_hash=e.get("specHash"),
            job_name=e.get("jobName"),
            generation=meta.get("generation"),
            observed_generation=e.get("observedGeneration"),
            labels=own.labels,
            policy=own.policy,
            policy_generation=own.policy_generation,
        )
        for e in variants.status_entries(body.get("status"))
        if e["name"] in targets
    }


def job_entry(body: Obj) -> JobEntry:
    ref = jobs.JobRef.of(body)
    return JobEntry(
        name=ref.name,
        spec_hash=ref.spec_hash,
        state=jobs.job_state(body),
        owner_uid=ref.owner_uid,
        step=((body.get("metadata") or {}).get("labels") or {}).get(STEP_LABEL, ""),
    )


@dataclass(frozen=True, slots=True)
class ServingEntry:
    """A serving Deployment (stable, canary or split part) of a CompressedModel."""

    name: str
    target: str  # its spec.targets entry; "" for the object's own


def serving_entry(body: Obj) -> ServingEntry:
    meta = body.get("metadata") or {}
    return ServingEntry(meta.get("name", ""), (meta.get("labels") or {}).get(TARGET_LABEL, ""))


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
    return _jobs_in(jobs_index, {jobs.JobState.running})


def holding_jobs(jobs_index: Any) -> dict[ModelKey, set[str]]:
    """Unfinished Job names per object: running, or under Kueue also suspended
    (waiting for admission). Each holds its object's place in a CompressionPolicy's
    maxConcurrent, and counts against the operator's limit where it applies."""
    return _jobs_in(jobs_index, jobs.UNFINISHED)


def _jobs_in(jobs_index: Any, states: Collection[jobs.JobState]) -> dict[ModelKey, set[str]]:
    """Names of the Jobs in one of `states`, per object that has any."""
    out: dict[ModelKey, set[str]] = {}
    for key, entries in snapshot(jobs_index):
        names = {e.name for e in entries if e.state in states}
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
    policies_index: Any = None
    serving_index: Any = None
    ready: bool = False

    def running_count(self) -> int:
        return sum(len(v) for v in running_jobs(self.jobs_index).values())

    def queued_count(self) -> int:
        return len(self.slots.waiting_now(queued_models(self.models_index)))


# ------------------------------------------------------------- status writes


def model_key(body: Obj) -> ModelKey:
    meta = body["metadata"]
    return variants.variant_key(meta["namespace"], meta["name"], body.get(variants.TARGET_KEY, ""))


def get_model(rt: Runtime, key: ModelKey) -> Obj | None:
    """The object of `key`; for a target's key its variant body (see `variants`)."""
    namespace, name, target = variants.split(key)
    body = rt.kube.get_model(namespace, name)
    if body is None or not target:
        return body
    return variant_body(body, target)


def variant_body(body: Obj, target: str) -> Obj | None:
    """`variants.variant_body` of the object with its CompressionPolicy merged in (the
    target's spec derives from the merged spec, as the object's own would)."""
    try:
        merged = policy.effective_body(body, selecting_policy(body))
    except InvalidSpec:
        return None  # the object's own reconcile reports it
    return variants.variant_body(merged, target)


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
    if variants.target_of(key):
        return _write_target_status(rt, key, compute)
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
        # Every status write passes here: messages quote storage errors and
        # Job log tails, which must never carry credentials into the API.
        new = redact_messages(new)
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
            post_event(
                rt,
                body,
                events.for_transition(old_phase, wanted.phase, wanted.reason, wanted.message),
            )
        return new
    raise Conflict(f"{namespace}/{name}: status kept changing under {STATUS_WRITE_ATTEMPTS} writes")


def _write_target_status(
    rt: Runtime,
    key: ModelKey,
    compute: Callable[[CompressedModelStatus, Obj], Transition | Obj | None],
) -> Obj | None:
    """write_status for a target: `compute` sees the target's entry as a status and
    the variant body; the entry goes back into status.targets under the summary.
    Returns the target's new entry (as a status), like write_status does."""
    namespace, name, target = variants.split(key)
    done: list[tuple[Obj, Phase, Transition]] = []

    def whole(_cur: CompressedModelStatus, body: Obj) -> Obj | None:
        done.clear()  # recomputed after a conflict
        vbody = variant_body(body, target)
        if vbody is None:
            return None  # the target is gone from the spec (or the spec broke)
        view = status.parse(vbody["status"])
        generation = body["metadata"].get("generation")
        wanted = compute(view, vbody)
        if wanted is None:
            return None
        at = status.now()
        if isinstance(wanted, Transition):
            new_view = status.apply(view, generation, wanted, at)
            done[:] = [(body, view.phase, wanted)]
        else:
            new_view = wanted
        order = variants.spec_target_names(body)
        return variants.with_target(
            body.get("status") or {}, target, new_view, order, generation, at
        )

    new = write_status(rt, (namespace, name), whole)
    if new is None:
        return None
    for body, old, t in done:
        event = events.for_transition(old, t.phase, t.reason, f"target {target}: {t.message}")
        post_event(rt, body, event)
    return variants.view(new, target)


def post_event(rt: Runtime, body: Obj, event: tuple[str, str, str] | None) -> None:
    if event is None:
        return
    try:
        rt.kube.post_event(events.build(body, *event))
    except Exception as exc:  # an Event is a courtesy; never fail a reconcile on it
        log.warning("event for %s/%s not posted: %s", *model_key(body), exc)


# --------------------------------------------------------------------- spec


# The CompressionPolicy index, registered once at startup (`use_policies`). A
# module-level source rather than an argument: every parse of a model in the
# operator (reconcile, Job result, rollout, cleanup, search fan-out) must see the
# same merged spec, or spec hashes would disagree; an argument threaded through
# each of those call sites is the one that gets forgotten.
_policies: Any = None


def use_policies(index: Any) -> None:
    global _policies
    _policies = index


def policies() -> list[policy.PolicyEntry]:
    """The CompressionPolicies the operator knows of (empty outside the operator)."""
    return policy.flatten(snapshot(_policies))


def selecting_policy(body: Obj) -> policy.PolicyEntry | None:
    """The policy that selects the object; InvalidSpec when two do."""
    try:
        return policy.policy_for(policies(), body)
    except policy.PolicyConflict as exc:
        raise InvalidSpec(str(exc)) from exc


def parse_model(body: Obj) -> CompressedModel:
    """The object with its CompressionPolicy's defaults merged in, validated in full."""
    chosen = selecting_policy(body)
    try:
        return CompressedModel.model_validate(policy.effective_body(body, chosen))
    except ValidationError as exc:
        message = format_validation_error(exc)
        raise InvalidSpec(message + policy.missing_hint(chosen, message)) from exc


# ------------------------------------------------------------------ storage


@contextlib.contextmanager
def storage_credentials(rt: Runtime, model: CompressedModel) -> Iterator[None]:
    """S3 credentials from the Secret the spec names, for this call only.

    Without a Secret the operator does not lend an object its own credentials
    (they may reach other namespaces' artifacts) unless the setting says so.
    """
    secret = model.spec.source.credentials_secret
    if not secret:
        if not rt.settings.inherit_storage_credentials:
            raise BadInput(
                "no spec.source.credentialsSecret: the operator uses storage for an object "
                "only with the object's own Secret (EDGESLIM_INHERIT_STORAGE_CREDENTIALS=true "
                "lends it the operator's credentials)"
            )
        yield
        return
    data = rt.kube.read_secret(model.metadata.namespace or "", secret)
    if data is None:
        raise BadInput(f"Secret {secret} (spec.source.credentialsSecret) not found")
    env = {k: v for k, v in data.items() if k.startswith("AWS_")}
    with storage.credentials(env):
        yield
