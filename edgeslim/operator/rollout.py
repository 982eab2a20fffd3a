"""The serving side: status from a serving Deployment's rollout (rollback
included), then the Deployment and Service the plan wants.

The pure planning and manifests live in `serving`; this module reads the
objects and applies what it returns.
"""

from __future__ import annotations

import contextlib
import logging

from edgeslim import metrics, storage
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, ServedArtifact
from edgeslim.errors import BadInput
from edgeslim.operator import (
    canary,
    ownership,
    rollout_status,
    serving,
    split_serving,
    status,
    variants,
)
from edgeslim.operator.claimed_apply import put
from edgeslim.operator.names import (
    APPLIED_HASH_ANNOTATION,
    MODEL_LABEL,
    PART_LABEL,
    TARGET_LABEL,
    part_serving_name,
    serving_name,
)
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import (
    InvalidSpec,
    Obj,
    Runtime,
    get_model,
    parse_model,
    post_event,
    storage_credentials,
    write_status,
)
from edgeslim.storage import s3

log = logging.getLogger("edgeslim.operator")


def deployment_changed(rt: Runtime, event_type: str | None, deployment: Obj) -> None:
    """A serving Deployment changed (its controller reports rollout progress)."""
    meta = deployment["metadata"]
    labels = meta.get("labels") or {}
    model, target = labels.get(MODEL_LABEL, ""), labels.get(TARGET_LABEL, "")
    key = variants.variant_key(meta["namespace"], model, target)
    if model and not target and labels.get(PART_LABEL, "").isdigit():
        if meta["name"] == part_serving_name(model, int(labels[PART_LABEL])):
            reconcile_serving(rt, key)  # a split model's part: the chain is read whole
        return
    if not model or meta["name"] != serving_name(model, target):
        return  # carries our label but not our name: not a serving Deployment of ours
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
    body = get_model(rt, key)  # a target's key: its variant body (see `variants`)
    if body is None or body["metadata"].get("deletionTimestamp"):
        canary.ACTIVE.discard(key)  # no more canary ticks for it
        return  # ownerReferences: the garbage collector takes Deployment and Service
    try:
        model = parse_model(body)
    except InvalidSpec:
        return  # the model handler reports this
    namespace, name = key[0], model.metadata.name
    sname = serving_name(name, variants.target_of(key))
    uid = model.metadata.uid or ""
    if deployment is None:
        deployment = rt.kube.read_deployment(namespace, sname)
    service = rt.kube.read_service(namespace, sname)
    claims = [
        ownership.claim(deployment, "Deployment", sname, name, uid),
        ownership.claim(service, "Service", sname, name, uid),
    ]
    generation = body["metadata"].get("generation")

    if model.spec.deployment is None:
        # Only what is ours goes; a foreign object of that name is none of our business.
        for found, obj, delete in (
            (claims[0], deployment, rt.kube.delete_deployment),
            (claims[1], service, rt.kube.delete_service),
        ):
            if found.verdict is ownership.Verdict.owned and obj is not None:
                delete(namespace, sname, obj["metadata"]["uid"])
                log.info("%s/%s: spec.deployment removed; deleted %s", *key, found.kind)
        canary.ACTIVE.discard(key)
        current = status.parse(body.get("status"))
        if current.canary is not None:  # a canary ever ran
            canary.remove(rt, namespace, name, variants.target_of(key), uid)
        split_serving.remove_parts(rt, key, name, uid, current)
        write_status(
            rt, key, lambda cur, _b: serving.without_deployment(cur, generation, status.now()), None
        )
        return

    try:
        for found in claims:
            ownership.require(found, namespace)
        if model.spec.deployment.split is not None:
            split_serving.reconcile(rt, key, body, model, (deployment, service))
            return
        split_serving.remove_parts(rt, key, name, uid, status.parse(body.get("status")))
        _roll_out(rt, key, body, model, deployment, service)
    except ownership.NameConflict as exc:
        _name_conflict(rt, key, body, str(exc))


def _name_conflict(rt: Runtime, key: ModelKey, body: Obj, message: str) -> None:
    """Failed / NameConflict with an Event, once: an unchanged status writes nothing
    and posts nothing, and nothing retries on a timer (a spec change or an
    operator restart reconciles again)."""
    generation = body["metadata"].get("generation")
    decided: list[tuple[CompressedModelStatus, serving.Plan]] = []

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj:
        p = serving.name_conflict(cur, message)
        decided[:] = [(cur, p)]
        return serving.apply_plan(cur, generation, p, status.now())

    if write_status(rt, key, compute, body) is None or not decided:
        return
    old, p = decided[0]
    for event in serving.events_for(old, p):
        post_event(rt, body, event)
    log.warning("%s/%s: %s", *key, message)


def _roll_out(
    rt: Runtime,
    key: ModelKey,
    body: Obj,
    model: CompressedModel,
    deployment: Obj | None,
    service: Obj | None,
) -> None:
    """Status from the Deployment's rollout, then the Deployment and Service the
    plan wants; both names are known to be free or this model's."""
    if canary.reconcile(rt, key, body, model, deployment):
        return  # a canary runs: it owns both Deployments until it ends (operator/canary.py)
    state = serving.rollout_state(deployment)
    spec_hash = model.spec.spec_hash()
    written = rollout_status.write_plan(rt, key, body, spec_hash, state)
    if written is None:
        return
    new, p = written
    if p.target is not None and serving.needs_storage_check(
        status.parse(new), spec_hash, state, p.target
    ):
        problem = _storage_mismatch(rt, model, p.target)
        if problem is not None:
            new = _record_corrupted(rt, key, body, spec_hash, state, p.target, problem)
            if new is None:
                return
            p = serving.plan(status.parse(new), spec_hash, state)
    if p.target is None:
        return
    # Both names were checked (absent or ours) before this function ran.
    if service is None:
        put(rt, model, serving.build_service(model), None)
    manifest = serving.build_deployment(model, p.target, rt.settings)
    wanted = manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    if deployment is not None and state.applied_hash == wanted:
        return
    put(rt, model, manifest, deployment)
    if service is not None:
        put(rt, model, serving.build_service(model), service)
    log.info(
        "%s/%s: Deployment %s runs artifact %s",
        *key,
        manifest["metadata"]["name"],
        p.target.sha256[:12],
    )


def _storage_mismatch(rt: Runtime, model: CompressedModel, artifact: ServedArtifact) -> str | None:
    """Why the artifact's bytes in storage are not the ones that passed the gate, or
    None when they are. Streams and hashes the object (nothing kept: no disk, no
    buffer); StorageUnavailable propagates, and the next event or resync retries.

    Only s3:// is checked here: a file:// artifact lives on the serving pods' file
    system, not the operator's. Those, and objects whose storage the operator may
    not use, rely on the serving pods' own sha check (they stay unready).
    """
    if storage.parse(artifact.uri)[0] != "s3":
        return None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(storage_credentials(rt, model))
        except BadInput as exc:
            log.warning("%s: artifact not checked in storage: %s", model.metadata.name, exc)
            return None
        try:
            _, digest = s3.read(artifact.uri, lambda _chunk: None, max_bytes=None, what="artifact")
        except BadInput as exc:  # gone, or grown past the download limit
            return str(exc)
    if digest != artifact.sha256:
        return (
            f"artifact {artifact.uri}: sha256 in storage is {digest}, "
            f"the compressor reported {artifact.sha256}"
        )
    return None


def _record_corrupted(
    rt: Runtime,
    key: ModelKey,
    body: Obj,
    spec_hash: str,
    state: serving.RolloutState,
    artifact: ServedArtifact,
    problem: str,
) -> Obj | None:
    """Failed / ArtifactCorrupted, written before anything else happens, so that
    neither this operator nor a restarted one ever rolls the artifact out."""
    generation = body["metadata"].get("generation")
    decided: list[tuple[CompressedModelStatus, serving.Plan]] = []

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj:
        p = serving.plan(serving.mark_corrupted(cur, spec_hash, artifact), spec_hash, state)
        decided[:] = [(cur, p)]
        return serving.apply_plan(cur, generation, p, status.now())

    new = write_status(rt, key, compute, body)
    if new is not None and decided:
        old, p = decided[0]
        if not serving.is_failed(old.failed_artifacts, artifact.sha256, spec_hash):
            post_event(rt, body, ("Warning", serving.CORRUPTED_REASON, problem[:1024]))
        for event in serving.events_for(old, p):
            post_event(rt, body, event)
        log.warning("%s/%s: not rolled out: %s", *key, problem)
    return new
