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
from edgeslim.operator import variants
from edgeslim.operator.claimed_apply import delete_serving
from edgeslim.operator.runtime import Obj, Runtime, snapshot, write_status

log = logging.getLogger("edgeslim.operator")


def retire(rt: Runtime, body: Obj, model: CompressedModel) -> None:
    """Deletes the children no target wants, before the targets are reconciled."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid") or ""
    wanted = {t.name for t in model.spec.targets or []}
    for key, entries in snapshot(rt.jobs_index):
        k_ns, k_name, target = variants.split(key)
        if (k_ns, k_name) != (namespace, name) or _wanted(target, wanted):
            continue
        for e in entries:
            if e.owner_uid == uid:
                log.info("%s/%s: deleting Job %s (no such target now)", namespace, name, e.name)
                rt.kube.delete_job(namespace, e.name)
        rt.slots.forget(key)
    # Serving objects come from the index of serving Deployments, not from the status:
    # another target's status write drops the entries of targets the spec no longer
    # names, and may come first. Canary Deployments and split parts are in it too.
    for key, entries in snapshot(rt.serving_index):
        if key != (namespace, name):
            continue
        for e in entries:
            if not _wanted(e.target, wanted):
                delete_serving(rt, namespace, e.name, name, uid, "no such target now")
    if not wanted and variants.status_entries(body.get("status")):
        write_status(
            rt,
            (namespace, name),
            lambda _c, b: variants.without_targets(b.get("status") or {}),
        )


def _wanted(target: str, wanted: set[str]) -> bool:
    """Whether the children of `target` ("": the object's own) are still wanted:
    a named target while the spec names it; the object's own while it names none."""
    return target in wanted if target else not wanted
