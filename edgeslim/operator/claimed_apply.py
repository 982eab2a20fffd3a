"""The one way serving objects are written: an apply checked against the owner.

Used by the rollout, the canary and a split model's parts alike, so a name
another object took between the ownership check and the write is always
reported as NameConflict, never overwritten or retried blindly. Deleting them
goes through the same check (`delete_serving`).
"""

from __future__ import annotations

import logging

from edgeslim.api.spec import CompressedModel
from edgeslim.operator import ownership
from edgeslim.operator.kube import Conflict
from edgeslim.operator.runtime import Obj, Runtime

log = logging.getLogger("edgeslim.operator")


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


def delete_serving(rt: Runtime, namespace: str, name: str, model: str, uid: str, why: str) -> None:
    """Deletes the Service and the Deployment called `name` where this model (`uid`)
    controls them. The Service goes first: after a crash in between, the Deployment
    is still there to be found again."""
    for kind, read, delete in (
        ("Service", rt.kube.read_service, rt.kube.delete_service),
        ("Deployment", rt.kube.read_deployment, rt.kube.delete_deployment),
    ):
        obj = read(namespace, name)
        found = ownership.claim(obj, kind, name, model, uid)
        if obj is not None and found.verdict is ownership.Verdict.owned:
            delete(namespace, name, obj["metadata"]["uid"])
            log.info("%s/%s: %s; deleted %s %s", namespace, model, why, kind, name)
