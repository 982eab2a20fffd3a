"""spec.targets as *variants*: one target of an object is handled exactly like an
object without targets, by the same code, under its own key.

Why not a second copy of the machinery: the queue, the slots, the Job and model
indexes, the Job watcher, result verification and the rollout all work on a key
`(namespace, name)`, an object body and its status. A target is given

* a key `(namespace, "<name>/<target>")` -- `/` never occurs in a Kubernetes
  name, so it cannot meet a real object's key; the indexes, the queue order and
  the slot reservations treat it like any object's key;
* a *variant body*: the object as the API returned it (metadata, uid,
  generation), but with the target's effective spec (`CompressedModelSpec.for_target`:
  its pipeline, its placement, `targets` reduced to that one class) and, as its
  status, the target's entry of `status.targets` in the shape of an object's
  status. Everything that parses it sees an ordinary CompressedModel whose spec
  hash is the target's own;
* a status writer that computes on that entry and writes it back into
  `status.targets` together with the summary (`aggregate`) at the top.

What remains target-specific is small and pure (this module), plus the labels
and placement that `jobs.build_job` and the serving builders add for a spec
with exactly one target -- which an effective spec always is.

Limits: an optimize search of a target runs as one Job (the pick step searches
alone, as under Kueue) instead of fanning out. `edgeslim compress --target NAME`
compresses one target locally exactly as its Job does.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import (
    CompressedModelStatus,
    ConditionType,
    Phase,
    TargetStatus,
)
from edgeslim.operator.status import MESSAGE_LIMIT, set_condition, set_progress

Obj = dict[str, Any]
ModelKey = tuple[str, str]

SEPARATOR = "/"
# Marks a variant body (never sent to the API server): which target it is.
TARGET_KEY = "edgeslimTarget"

# While any target still works the summary shows the one furthest behind.
_BEHIND = (Phase.compressing, Phase.queued, Phase.pending, Phase.deploying)


def variant_key(namespace: str, name: str, target: str = "") -> ModelKey:
    return (namespace, f"{name}{SEPARATOR}{target}" if target else name)


def split(key: ModelKey) -> tuple[str, str, str]:
    """(namespace, object name, target) of a key; target "" for an object's own key."""
    name, _, target = key[1].partition(SEPARATOR)
    return key[0], name, target


def target_of(key: ModelKey) -> str:
    return split(key)[2]


def spec_target_names(body: Obj) -> list[str]:
    """Target names as written in the spec, read leniently (indexes must never fail)."""
    targets = (body.get("spec") or {}).get("targets") or []
    if not isinstance(targets, list):
        return []
    return [t["name"] for t in targets if isinstance(t, dict) and isinstance(t.get("name"), str)]


def status_entries(raw_status: Obj | None) -> list[Obj]:
    entries = (raw_status or {}).get("targets") or []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]


def view(raw_status: Obj | None, target: str) -> Obj:
    """The target's status entry in the shape of an object's status (wire form)."""
    entry = next((e for e in status_entries(raw_status) if e["name"] == target), {})
    return {k: v for k, v in entry.items() if k != "name"}


def variant_body(body: Obj, target: str) -> Obj | None:
    """The object as its target's Job, results and rollout see it; None when the
    spec does not parse or no longer names the target."""
    try:
        model = CompressedModel.model_validate(body)
        spec = model.spec.for_target(target)
    except (ValidationError, KeyError):
        return None
    out = {k: v for k, v in body.items() if k not in ("spec", "status")}
    return {
        **out,
        "spec": spec.wire(),
        "status": view(body.get("status"), target),
        TARGET_KEY: target,
    }


def entry_of(target: str, new_view: Obj) -> Obj:
    """A written view back as a status.targets entry (fields an entry has, only)."""
    return TargetStatus.model_validate({**new_view, "name": target}).wire()


def _combined(entries: list[TargetStatus], kind: str) -> str | None:
    found = [next((c.status for c in e.conditions if c.type == kind), "Unknown") for e in entries]
    if kind == ConditionType.available and not any(
        c.type == kind for e in entries for c in e.conditions
    ):
        return None
    if found and all(s == "True" for s in found):
        return "True"
    return "False" if "False" in found else "Unknown"


def summary(entries: list[TargetStatus]) -> tuple[Phase, TargetStatus | None]:
    """The object's phase from its targets', and the target that decides it."""
    for phase in _BEHIND:
        hit = next((e for e in entries if e.phase is phase), None)
        if hit is not None:
            return phase, hit
    for phase in (Phase.failed, Phase.rejected):
        hit = next((e for e in entries if e.phase is phase), None)
        if hit is not None:
            return phase, hit
    return Phase.ready, None


def aggregate(
    current: Obj, entries: list[Obj], order: list[str], generation: int | None, at: str
) -> Obj:
    """The whole status: `entries` (ordered as the spec names the targets, one per
    target, a target without one yet Pending) and the summary at the top."""
    by_name = {e["name"]: e for e in entries}
    targets = [TargetStatus.model_validate(by_name.get(n) or {"name": n}) for n in order]
    phase, decider = summary(targets)
    ready = sum(t.phase is Phase.ready for t in targets)
    counted = f"{ready}/{len(targets)}"
    if decider is None:
        reason, message = "AllTargetsReady", f"{counted} targets ready"
    else:
        cond = next((c for c in decider.conditions if c.type == ConditionType.ready), None)
        reason = cond.reason if cond is not None else decider.phase.value
        detail = decider.message or decider.phase.value
        message = f"{counted} targets ready; {decider.name}: {detail}"
    cur = CompressedModelStatus.model_validate(current)
    conds = list(cur.conditions)
    ready_status = {Phase.ready: "True", Phase.failed: "False", Phase.rejected: "False"}
    conds = set_condition(
        conds,
        ConditionType.ready,
        ready_status.get(phase, "Unknown"),
        reason,
        message,
        generation,
        at,
    )
    for kind in (ConditionType.compressed, ConditionType.gate_passed, ConditionType.available):
        value = _combined(targets, kind)
        if value is None:
            conds = [c for c in conds if c.type != kind]
            continue
        why = {"True": f"AllTargets{kind.value}", "False": reason}.get(value, phase.value)
        conds = set_condition(conds, kind, value, why, message, generation, at)
    conds = set_progress(conds, phase, reason, message, generation, at)
    replicas = [t.ready_replicas for t in targets if t.ready_replicas is not None]
    return cur.model_copy(
        update={
            "phase": phase,
            "observed_generation": generation,
            "spec_hash": None,
            "job_name": None,
            "message": message[:MESSAGE_LIMIT],
            "candidates": None,
            "conditions": conds,
            "artifact": None,
            "results": None,
            "serving_artifact": None,
            "ready_replicas": sum(replicas) if replicas else None,
            "last_good_artifact": None,
            "failed_artifacts": [],
            # Each target's canary is in its entry (the CANARY column stays empty).
            "canary": None,
            "targets": targets,
            "targets_ready": counted,
        }
    ).wire()


def with_target(
    current: Obj, target: str, new_view: Obj, order: list[str], generation: int | None, at: str
) -> Obj:
    """The whole status after one target's entry became `new_view`."""
    entries = [e for e in status_entries(current) if e["name"] != target]
    entries.append(entry_of(target, new_view))
    return aggregate(current, entries, order, generation, at)


def without_targets(current: Obj) -> Obj:
    """The status once spec.targets is gone: no entries, no count."""
    cur = CompressedModelStatus.model_validate(current)
    return cur.model_copy(update={"targets": None, "targets_ready": None}).wire()
