"""Kueue's part in a compressor Job (EDGESLIM_KUEUE_QUEUE): pure functions only.

Every compressor Job -- an object's own, and each plan, candidate and pick Job
of a fanned-out search (`fanout`) -- is created suspended with Kueue's queue
label, and Kueue un-suspends it when its ClusterQueue's quota has room. Kueue's
quota replaces the operator's overall Job limit (EDGESLIM_MAX_CONCURRENT_JOBS
does not apply); a CompressionPolicy's maxConcurrent still does: a model it
holds back stays Queued without a Job until one of the policy's Jobs ends,
and a suspended Job counts against its policy like a running one.

Kueue counts only what pods request. A Job whose spec requests no CPU would fit
any quota, so all of them would be admitted at once; such a Job requests
`DEFAULT_CPU` (or its CPU limit, which is what Kubernetes would default the
request to) so that a ClusterQueue's `cpu` quota counts it.
"""

from __future__ import annotations

import copy
from typing import Any

from edgeslim.api.status import CompressedModelStatus, ConditionType, Phase
from edgeslim.operator.names import KUEUE_QUEUE_LABEL
from edgeslim.operator.status import Transition

Obj = dict[str, Any]

DEFAULT_CPU = "1"
WAITING = "WaitingForKueue"


def queued(job: Obj, queue: str) -> Obj:
    """A copy of `job` that waits for Kueue: queue label, suspended, a CPU request."""
    out = copy.deepcopy(job)
    out["metadata"].setdefault("labels", {})[KUEUE_QUEUE_LABEL] = queue
    out["spec"]["suspend"] = True
    for container in out["spec"]["template"]["spec"]["containers"]:
        resources = container.setdefault("resources", {})
        requests = resources.setdefault("requests", {})
        if "cpu" not in requests:
            requests["cpu"] = (resources.get("limits") or {}).get("cpu", DEFAULT_CPU)
    return out


def waiting(cur: CompressedModelStatus, spec_hash: str, job: str, queue: str) -> Transition | None:
    """Status while the spec's first Job waits for admission; None when Kueue already
    admitted one of this spec's Jobs (a resumed operator must not say Queued again)."""
    if cur.spec_hash == spec_hash and cur.phase == Phase.compressing:
        return None
    return Transition(
        Phase.queued,
        WAITING,
        f"Job {job} waits for admission by Kueue queue {queue}",
        spec_hash=spec_hash,
        job_name=job,
    )


def is_waiting(cur: CompressedModelStatus, spec_hash: str) -> bool:
    """True when the spec's Job was started and waits for Kueue (`waiting` wrote it)."""
    if cur.phase != Phase.queued or cur.spec_hash != spec_hash:
        return False
    return any(c.type == ConditionType.ready and c.reason == WAITING for c in cur.conditions)


def admitted(cur: CompressedModelStatus, job: str, spec_hash: str, step: bool) -> Transition | None:
    """Compressing once Kueue admits the object's Job, or for a search any of its
    step Jobs (the plan comes first); None when there is nothing to change."""
    if cur.phase != Phase.queued or cur.spec_hash != spec_hash:
        return None
    if cur.job_name != job and not step:
        return None
    return Transition(
        Phase.compressing,
        "Compressing",
        f"Job {job} admitted by Kueue",
        spec_hash=spec_hash,
        job_name=cur.job_name,
    )
