"""The one way serving objects are written: an apply checked against the owner.

Used by the rollout, the canary and a split model's parts alike, so a name
another object took between the ownership check and the write is always
reported as NameConflict, never overwritten or retried blindly.
"""

from __future__ import annotations

from edgeslim.api.spec import CompressedModel
from edgeslim.operator import ownership
from edgeslim.operator.kube import Conflict
from edgeslim.operator.runtime import Obj, Runtime


def put(rt: Runtime, model: CompressedModel, manifest: Obj, existing: Obj | None) -> None:
    """Server-side apply to `existing` (checked to be this model's) or, when it was
    absent, create-only. When another object took the name since the check, the
    apply is refused; read it and claim again: NameConflict, or a retry."""
    kind, meta = manifest["kind"], manifest["metadata"]
    apply, read = {
        "Deployment": (rt.kube.apply_deployment, rt.kube.read_deployment),
        "Service": (rt.kube.apply_service, rt.kube.read_service),
    }[kind]
    try:
        apply(manifest, existing["metadata"]["uid"] if existing else None)
    except Conflict:
        now = read(meta["namespace"], meta["name"])
        name, uid = model.metadata.name, model.metadata.uid or ""
        ownership.require(ownership.claim(now, kind, meta["name"], name, uid), meta["namespace"])
        raise  # ours or gone after all: the next reconcile applies again
