"""Pure status transitions: (current status, what happened) -> new status.

Conditions follow metav1.Condition: `lastTransitionTime` moves only when a
condition's status flips, every condition and the status itself carry the
observedGeneration they describe, reasons are one CamelCase word.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from edgeslim.api.status import (
    ArtifactStatus,
    CompressedModelStatus,
    Condition,
    ConditionType,
    Phase,
    Results,
)

Obj = dict[str, Any]
FINAL_PHASES = frozenset({Phase.ready, Phase.rejected, Phase.failed})
# The compression of the status' spec hash is over (Deploying: its artifact rolls out).
COMPRESSED_PHASES = FINAL_PHASES | {Phase.deploying}
MESSAGE_LIMIT = 4096


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(raw: Obj | None) -> CompressedModelStatus:
    """The status as written by any operator version; unknown keys are ignored."""
    return CompressedModelStatus.model_validate(raw or {})


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    at: str,
) -> list[Condition]:
    """`conditions` with `type_` set; its lastTransitionTime kept unless status flips."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else at
    new = Condition(
        type=type_,
        status=status,  # type: ignore[arg-type]
        reason=reason,
        message=message[:MESSAGE_LIMIT],
        last_transition_time=since,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    order = [t.value for t in ConditionType]
    return sorted(
        out, key=lambda c: (order.index(c.type) if c.type in order else len(order), c.type)
    )


# Phases in which the operator is still working towards the spec: kstatus
# reads Reconciling=True on them as InProgress (not Current, as a bare Ready
# condition of Unknown or False would leave it to guess).
IN_PROGRESS_PHASES = frozenset({Phase.pending, Phase.queued, Phase.compressing, Phase.deploying})
# Phases the operator cannot leave without a spec change (or a new source):
# Stalled=True, which kstatus reads as Failed.
STALLED_PHASES = frozenset({Phase.rejected, Phase.failed})


def set_progress(
    conditions: list[Condition],
    phase: Phase,
    reason: str,
    message: str,
    generation: int | None,
    at: str,
) -> list[Condition]:
    """`conditions` with Reconciling and Stalled set for `phase`, the pair
    kstatus (sigs.k8s.io/cli-utils) and the API conventions define.

    Both are "abnormal-true" conditions, written False rather than left out, so
    a reader sees the generation they describe. Reconciling's reason is the
    phase (what the operator is doing); Stalled's is the transition's reason
    (why it stopped: GateRejected, CompressionFailed, RolloutFailed, ...).
    """
    working = phase in IN_PROGRESS_PHASES
    stalled = phase in STALLED_PHASES
    conds = set_condition(
        conditions,
        ConditionType.reconciling,
        "True" if working else "False",
        phase.value,
        message if working else "",
        generation,
        at,
    )
    return set_condition(
        conds,
        ConditionType.stalled,
        "True" if stalled else "False",
        reason if stalled else phase.value,
        message if stalled else "",
        generation,
        at,
    )


@dataclass(frozen=True)
class Transition:
    """What the reconciler wants the status to say."""

    phase: Phase
    reason: str
    message: str
    spec_hash: str | None = None
    job_name: str | None = None
    artifact: ArtifactStatus | None = None
    results: Results | None = None
    extra: Obj | None = None
    """More status fields (wire form) written with this transition, e.g. lineage."""


# (Ready, Compressed, GatePassed) per phase; None = taken from the transition.
_CONDITIONS: dict[Phase, tuple[str, str, str]] = {
    Phase.pending: ("Unknown", "Unknown", "Unknown"),
    Phase.queued: ("Unknown", "Unknown", "Unknown"),
    Phase.compressing: ("Unknown", "Unknown", "Unknown"),
    Phase.deploying: ("Unknown", "True", "True"),
    Phase.ready: ("True", "True", "True"),
    Phase.rejected: ("False", "True", "False"),
    Phase.failed: ("False", "False", "Unknown"),
}


def apply(current: CompressedModelStatus, generation: int | None, t: Transition, at: str) -> Obj:
    """The whole new status (wire form) after transition `t`."""
    ready, compressed, gate = _CONDITIONS.get(t.phase, ("Unknown", "Unknown", "Unknown"))
    conds = list(current.conditions)
    ready_reason = t.reason
    compressed_reason = {
        "True": "Compressed",
        "False": t.reason,
        "Unknown": t.phase.value,
    }[compressed]
    gate_reason = {
        "True": "WithinMaxMetricDrop",
        "False": "ExceedsMaxMetricDrop",
        "Unknown": "NotEvaluated" if t.phase is Phase.failed else t.phase.value,
    }[gate]
    gate_message = t.results.gate.reason if t.results else ""
    if t.phase is Phase.rejected and not gate_message:
        gate_message = t.message
    conds = set_condition(
        conds, ConditionType.ready, ready, ready_reason, t.message, generation, at
    )
    conds = set_condition(
        conds,
        ConditionType.compressed,
        compressed,
        compressed_reason,
        t.message if compressed != "True" else (t.artifact.uri if t.artifact else ""),
        generation,
        at,
    )
    conds = set_condition(
        conds, ConditionType.gate_passed, gate, gate_reason, gate_message, generation, at
    )
    conds = set_progress(conds, t.phase, t.reason, t.message, generation, at)
    new = current.model_copy(
        update={
            "phase": t.phase,
            "observed_generation": generation,
            "spec_hash": t.spec_hash,
            "job_name": t.job_name,
            "message": t.message[:MESSAGE_LIMIT] or None,
            "conditions": conds,
            "artifact": t.artifact,
            "results": t.results,
        }
    )
    return {**new.wire(), **(t.extra or {})}


def touch_generation(current: CompressedModelStatus, generation: int | None) -> Obj | None:
    """A spec change that does not change the artifact (resources, deployment):
    the status stays, but now describes the new generation. None = nothing to write."""
    if current.observed_generation == generation:
        return None
    conds = [c.model_copy(update={"observed_generation": generation}) for c in current.conditions]
    return current.model_copy(
        update={"observed_generation": generation, "conditions": conds}
    ).wire()


def merge_patch(old: Obj, new: Obj) -> Obj:
    """RFC 7386 merge patch turning `old` into `new` (removed keys become null)."""
    patch: Obj = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before or key not in old:
            patch[key] = value
    return patch


def is_settled(current: CompressedModelStatus, spec_hash: str, generation: int | None) -> bool:
    """True when the status already gives the final word on this spec and generation."""
    return (
        current.spec_hash == spec_hash
        and current.phase in FINAL_PHASES
        and current.observed_generation == generation
    )
