"""The serving side: status from a serving Deployment's rollout (rollback
included), then the Deployment and Service the plan wants.

The pure planning and manifests live in `serving`; this module reads the
objects and applies what it returns.
"""

from __future__ import annotations

import logging

from edgeslim import metrics
from edgeslim.api.status import CompressedModelStatus
from edgeslim.operator import serving, status
from edgeslim.operator.kube import Conflict
from edgeslim.operator.names import APPLIED_HASH_ANNOTATION, MODEL_LABEL, serving_name
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import (
    InvalidSpec,
    Obj,
    Runtime,
    parse_model,
    post_event,
    write_status,
)

log = logging.getLogger("edgeslim.operator")


def deployment_changed(rt: Runtime, event_type: str | None, deployment: Obj) -> None:
    """A serving Deployment changed (its controller reports rollout progress)."""
    meta = deployment["metadata"]
    key = (meta["namespace"], (meta.get("labels") or {}).get(MODEL_LABEL, ""))
    if not key[1]:
        return
    reconcile_serving(rt, key, None if event_type == "DELETED" else deployment)


def serve_quietly(rt: Runtime, key: ModelKey) -> None:
    """From the Job watcher and the resync: a failure here must not fail them;
    the object stays Deploying and the resync tries again."""
    try:
        reconcile_serving(rt, key)
    except Exception as exc:
        metrics.reconcile_errors.labels(handler="serving").inc()
        log.warning("%s/%s: serving not reconciled yet: %s", *key, exc)


def reconcile_serving(rt: Runtime, key: ModelKey, deployment: Obj | None = None) -> None:
    """Status from the Deployment's rollout, then the Deployment the plan wants.

    Status first: a rollback records the failed artifact before the Deployment
    changes, so an operator that dies in between never rolls it out again.
    """
    body = rt.kube.get_model(*key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # ownerReferences: the garbage collector takes Deployment and Service
    try:
        model = parse_model(body)
    except InvalidSpec:
        return  # the model handler reports this
    namespace, name = key
    if deployment is None:
        deployment = rt.kube.read_deployment(namespace, serving_name(name))
    state = serving.rollout_state(deployment)
    if deployment is not None and state.owner_uid != model.metadata.uid:
        # An older object's of the same name, or not ours at all: never touched.
        raise Conflict(f"Deployment {serving_name(name)} is not owned by this object")
    generation = body["metadata"].get("generation")

    if model.spec.deployment is None:
        if deployment is not None:
            rt.kube.delete_serving(namespace, serving_name(name))
            log.info("%s/%s: spec.deployment removed; deleted Deployment and Service", *key)
        write_status(
            rt, key, lambda cur, _b: serving.without_deployment(cur, generation, status.now()), body
        )
        return

    spec_hash = model.spec.spec_hash()
    decided: list[tuple[CompressedModelStatus, serving.Plan]] = []

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj:
        p = serving.plan(cur, spec_hash, state)
        decided[:] = [(cur, p)]
        return serving.apply_plan(cur, generation, p, status.now())

    new = write_status(rt, key, compute, body)
    if new is None:
        return
    old, p = decided[0]
    for event in serving.events_for(old, p):
        post_event(rt, body, event)
    # Again on the written status: a rollback just recorded now targets the last good.
    p = serving.plan(status.parse(new), spec_hash, state)
    if p.target is None:
        return
    manifest = serving.build_deployment(model, p.target, rt.settings)
    wanted = manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    if deployment is not None and state.applied_hash == wanted:
        return
    rt.kube.apply_deployment(manifest)
    rt.kube.apply_service(serving.build_service(model))
    log.info(
        "%s/%s: Deployment %s runs artifact %s",
        *key,
        manifest["metadata"]["name"],
        p.target.sha256[:12],
    )
