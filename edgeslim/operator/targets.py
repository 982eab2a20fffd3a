"""spec.targets in the cluster: what the variants (see `variants`) cannot see.

Each target is reconciled, compressed, verified and rolled out by the same code
as an object without targets, under its own key. What is left is the object's
side of a change of targets: Jobs, Deployments and Services of targets the spec
no longer names (or of the object itself, once it names targets; or of every
target, once it names none) are deleted, canary Deployments included -- only
those this object owns.
"""

from __future__ import annotations

import logging

from edgeslim.api.spec import CompressedModel
from edgeslim.operator import canary, ownership, variants
from edgeslim.operator.names import serving_name
from edgeslim.operator.runtime import Obj, Runtime, snapshot, write_status

log = logging.getLogger("edgeslim.operator")


def retire(rt: Runtime, body: Obj, model: CompressedModel) -> None:
    """Deletes the children no target wants, before the targets are reconciled."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
    wanted = {t.name for t in model.spec.targets or []}
    for key, entries in snapshot(rt.jobs_index):
        k_ns, k_name, target = variants.split(key)
        if (k_ns, k_name) != (namespace, name) or (target in wanted if target else not wanted):
            continue
        for e in entries:
            if e.owner_uid == uid:
                log.info("%s/%s: deleting Job %s (no such target now)", namespace, name, e.name)
                rt.kube.delete_job(namespace, e.name)
        rt.slots.forget(key)
    entries = variants.status_entries(body.get("status"))
    # Serving objects (Deployment, Service, canary Deployment) nobody wants: those of
    # targets in the status but no longer in the spec, and the object's own ("" below).
    # That one can only exist from before the object had targets, so it is looked for
    # until targets are recorded.
    stale = [e["name"] for e in entries if e["name"] not in wanted]
    if wanted and not entries:
        stale.append("")
    for target in stale:
        _delete_owned(rt, namespace, serving_name(name, target), name, uid or "")
        canary.remove(rt, namespace, name, target, uid or "")
    if not wanted and entries:
        write_status(
            rt,
            (namespace, name),
            lambda _c, b: variants.without_targets(b.get("status") or {}),
        )


def _delete_owned(rt: Runtime, namespace: str, sname: str, model: str, uid: str) -> None:
    for kind, read, delete in (
        ("Deployment", rt.kube.read_deployment, rt.kube.delete_deployment),
        ("Service", rt.kube.read_service, rt.kube.delete_service),
    ):
        obj = read(namespace, sname)
        found = ownership.claim(obj, kind, sname, model, uid)
        if obj is not None and found.verdict is ownership.Verdict.owned:
            delete(namespace, sname, obj["metadata"]["uid"])
            log.info("%s/%s: deleted %s %s (no such target now)", namespace, model, kind, sname)
