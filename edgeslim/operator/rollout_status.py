"""Writing a rollout decision into a CompressedModel's status, with what follows from
it: the Events of the change and the finished-rollout metric. Shared by the single
Deployment (operator/rollout.py) and the split chain (operator/split_serving.py), so
both report a rollout the same way."""

from __future__ import annotations

from collections.abc import Callable

from edgeslim import metrics
from edgeslim.api.status import CompressedModelStatus
from edgeslim.operator import serving, status
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import Obj, Runtime, post_event, write_status


def write_plan(
    rt: Runtime,
    key: ModelKey,
    body: Obj,
    spec_hash: str,
    state: serving.RolloutState,
    extra: Callable[[serving.Plan], Obj] | None = None,
) -> tuple[Obj, serving.Plan] | None:
    """Writes `serving.plan` for `state` (plus the fields `extra` gives for the plan),
    posts the Events and counts the rollout the change ended. Returns the written
    status and the plan made again on it (a rollback just recorded now targets the
    last good artifact); None when nothing was written."""
    generation = body["metadata"].get("generation")
    decided: list[tuple[CompressedModelStatus, serving.Plan]] = []

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj:
        p = serving.plan(cur, spec_hash, state)
        decided[:] = [(cur, p)]
        new = serving.apply_plan(cur, generation, p, status.now())
        if extra is not None:
            new |= extra(p)
        return new

    new = write_status(rt, key, compute, body)
    if new is None:
        return None
    old, p = decided[0]
    for event in serving.events_for(old, p):
        post_event(rt, body, event)
    result = serving.rollout_result(old, p)
    if result is not None:
        metrics.rollouts.labels(result=result).inc()
    return new, serving.plan(status.parse(new), spec_hash, state)
