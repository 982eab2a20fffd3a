"""deployment.split: one Deployment and Service per part of a split artifact.

Part i runs `parts/part-<i>.onnx` (pinned by its sha256) in `<name>-part-<i>`,
started with the next part's Service URL (`EDGESLIM_NEXT_PART_URL`), so it
forwards its outputs down the chain; clients call part 0's Service. A part
server is ready only while the next part is, so part 0's readiness covers the
whole chain.

The rollout decision is the single Deployment's (`serving.plan`), fed with the
chain read as one Deployment (`chain_state`): failed when any part's
Deployment gave up (ProgressDeadlineExceeded), complete only when every part's
Deployment runs the same artifact on all its replicas. So rollback, the
failed-artifact record and the phase follow the same rules as without a split.
"""

from __future__ import annotations

import logging

from edgeslim.api.spec import MAX_SPLIT_PARTS, CompressedModel
from edgeslim.api.status import (
    CompressedModelStatus,
    PartArtifact,
    ServedArtifact,
    SplitServingStatus,
)
from edgeslim.operator import ownership, rollout_status, serving, status
from edgeslim.operator.claimed_apply import delete_serving, put
from edgeslim.operator.names import (
    API_GROUP,
    APPLIED_HASH_ANNOTATION,
    PART_LABEL,
    SERVING_PORT,
    part_serving_name,
    serving_name,
)
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import Obj, Runtime, write_status
from edgeslim.operator.settings import Settings

log = logging.getLogger("edgeslim.operator")

NEXT_PART_ENV = "EDGESLIM_NEXT_PART_URL"
# On a part's pod template: which part of the artifact its pods run.
PART_SHA_ANNOTATION = f"{API_GROUP}/part-sha256"
PART_URI_ANNOTATION = f"{API_GROUP}/part-uri"


# ------------------------------------------------------------------ builders


def next_part_url(model: CompressedModel, index: int) -> str:
    """Part `index + 1`'s Service, by its cluster DNS name (the pods have no service links)."""
    meta = model.metadata
    host = f"{part_serving_name(meta.name, index + 1)}.{meta.namespace}.svc"
    return f"http://{host}:{SERVING_PORT}/v2/models/{meta.name}"


def _part_labels(obj: Obj, index: int) -> Obj:
    return {**obj, PART_LABEL: str(index)}


def build_part_deployment(
    model: CompressedModel, artifact: ServedArtifact, index: int, settings: Settings
) -> Obj:
    """Part `index` of `artifact` as a Deployment: the single serving Deployment's pod
    (probes, limits, security, strategy), its own part file and sha256, the next
    part's URL unless it is the last, and the placement split.placement gives it."""
    parts = artifact.parts or []
    if not 0 <= index < len(parts):
        raise ValueError(f"artifact {artifact.sha256[:12]} has no part {index}")
    part = parts[index]
    split = model.spec.deployment.split if model.spec.deployment else None
    m = serving.build_deployment(model, artifact, settings)
    name = part_serving_name(model.metadata.name, index)
    meta, spec = m["metadata"], m["spec"]
    meta["name"] = name
    del meta["annotations"][APPLIED_HASH_ANNOTATION]
    meta["labels"] = _part_labels(meta["labels"], index)
    spec["selector"]["matchLabels"] = _part_labels(spec["selector"]["matchLabels"], index)
    template = spec["template"]
    template["metadata"]["labels"] = _part_labels(template["metadata"]["labels"], index)
    template["metadata"]["annotations"] |= {
        PART_SHA_ANNOTATION: part.sha256,
        PART_URI_ANNOTATION: part.uri,
    }
    pod = template["spec"]
    container = pod["containers"][0]
    command = list(container["command"])
    command[command.index("--model") + 1] = part.uri
    command[command.index("--sha256") + 1] = part.sha256
    container["command"] = command
    if index + 1 < len(parts):
        container["env"] = [
            *container["env"],
            {"name": NEXT_PART_ENV, "value": next_part_url(model, index)},
        ]
    placement = split.placement[index] if split and index < len(split.placement) else None
    if placement is not None and placement.node_selector:
        pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **placement.node_selector}
    if placement is not None and placement.tolerations:
        extra = [t.wire() for t in placement.tolerations]
        have = pod.get("tolerations", [])
        pod["tolerations"] = [*have, *(t for t in extra if t not in have)]
    meta["annotations"][APPLIED_HASH_ANNOTATION] = serving.applied_hash(m)
    return m


def build_part_service(model: CompressedModel, index: int) -> Obj:
    """ClusterIP Service in front of part `index`'s pods."""
    s = serving.build_service(model)
    s["metadata"]["name"] = part_serving_name(model.metadata.name, index)
    s["metadata"]["labels"] = _part_labels(s["metadata"]["labels"], index)
    s["spec"]["selector"] = _part_labels(s["spec"]["selector"], index)
    return s


# ------------------------------------------------------------ reading the chain


def _part_of(deployment: Obj) -> PartArtifact | None:
    ann = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    sha, uri = ann.get(PART_SHA_ANNOTATION), ann.get(PART_URI_ANNOTATION)
    return PartArtifact(uri=uri, sha256=sha) if sha and uri else None


def chain_state(deployments: list[Obj | None]) -> serving.RolloutState:
    """The part Deployments, in order, read as one Deployment.

    Absent when none exists; Failed when any part's rollout gave up (the artifact
    is the one that part was rolling out); Complete only when every part exists,
    runs the same artifact and has completed; Progressing otherwise. Ready
    replicas are the fewest of any part: the chain serves no more in parallel.
    """
    states = [serving.rollout_state(d) for d in deployments]
    present = [(d, s) for d, s in zip(deployments, states, strict=True) if d is not None]
    if not present:
        return serving.RolloutState(serving.Rollout.absent)
    failed = next((s for _d, s in present if s.rollout is serving.Rollout.failed), None)
    shas = {s.artifact.sha256 if s.artifact else None for _d, s in present}
    first = present[0][1]
    whole = (failed or first).artifact
    artifact = None
    if whole is not None:
        parts = [
            _part_of(d) for d, s in present if s.artifact and s.artifact.sha256 == whole.sha256
        ]
        artifact = whole.model_copy(
            update={"parts": parts if all(parts) and len(shas) == 1 else None}
        )
    common = {
        "artifact": artifact,
        "replicas": first.replicas,
        "ready_replicas": min(s.ready_replicas for s in states),
        "updated_replicas": min(s.updated_replicas for s in states),
        "owner_uid": first.owner_uid,
    }
    if failed is not None:
        return serving.RolloutState(serving.Rollout.failed, message=failed.message, **common)
    done = (
        len(present) == len(deployments)
        and len(shas) == 1
        and all(s.rollout is serving.Rollout.complete for s in states)
    )
    rollout = serving.Rollout.complete if done else serving.Rollout.progressing
    return serving.RolloutState(rollout, **common)


# ------------------------------------------------------------------ reconcile


def reconcile(
    rt: Runtime,
    key: ModelKey,
    body: Obj,
    model: CompressedModel,
    single: tuple[Obj | None, Obj | None],
) -> None:
    """The part Deployments and Services of a split model, and the status they lead to.

    `single` is the model's own Deployment and Service (`<name>`), already claimed:
    a model that switched to a split no longer runs them.
    """
    namespace, name = key[0], model.metadata.name
    uid = model.metadata.uid or ""
    for obj, delete in (
        (single[0], rt.kube.delete_deployment),
        (single[1], rt.kube.delete_service),
    ):
        if obj is not None:
            delete(namespace, serving_name(name), obj["metadata"]["uid"])
            log.info("%s/%s: deployment.split: deleted the single %s", *key, obj["kind"])
    cur = status.parse(body.get("status"))
    spec_hash = model.spec.spec_hash()
    cand = serving.candidate(cur, spec_hash)
    # Every part that may exist: what runs (status) and what the candidate brings.
    known = max(
        cur.split.parts if cur.split else 0,
        len(cand.parts or []) if cand else 0,
        len(cur.last_good_artifact.parts or []) if cur.last_good_artifact else 0,
    )
    known = min(known, MAX_SPLIT_PARTS)
    deps = [rt.kube.read_deployment(namespace, part_serving_name(name, i)) for i in range(known)]
    svcs = [rt.kube.read_service(namespace, part_serving_name(name, i)) for i in range(known)]
    for i in range(known):
        pname = part_serving_name(name, i)
        ownership.require(ownership.claim(deps[i], "Deployment", pname, name, uid), namespace)
        ownership.require(ownership.claim(svcs[i], "Service", pname, name, uid), namespace)
    running = cur.split.parts if cur.split else len([d for d in deps if d is not None])
    state = chain_state(deps[: max(running, 1)] if deps else [])

    def split_status(p: serving.Plan) -> Obj:
        count = len(p.target.parts or []) if p.target else running
        wire = SplitServingStatus(
            parts=count,
            service=part_serving_name(name, 0),
            ready_replicas=[serving.rollout_state(d).ready_replicas for d in deps[:count]],
        ).wire()
        return {"split": wire}

    written = rollout_status.write_plan(rt, key, body, spec_hash, state, split_status)
    if written is None:
        return
    _, p = written
    if p.target is None:
        return
    if not p.target.parts:
        # An artifact made without a split (the last good one before the spec asked
        # for one) cannot run as a chain; nothing is changed.
        log.warning("%s/%s: artifact %s has no parts to serve", *key, p.target.sha256[:12])
        return
    count = len(p.target.parts)
    # Services first, then Deployments back to front: a part's pods get ready only
    # once the next part's Service has ready pods behind it.
    for i in range(count):
        svc = svcs[i] if i < known else None
        wanted = build_part_service(model, i)
        if svc is None or svc.get("spec", {}).get("selector") != wanted["spec"]["selector"]:
            put(rt, model, wanted, svc)
    for i in reversed(range(count)):
        existing = deps[i] if i < known else None
        manifest = build_part_deployment(model, p.target, i, rt.settings)
        applied = (existing or {}).get("metadata", {}).get("annotations", {})
        wanted_hash = manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
        if existing is None or applied.get(APPLIED_HASH_ANNOTATION) != wanted_hash:
            put(rt, model, manifest, existing)
    for i in range(count, known):  # parts a smaller split no longer has
        pname = part_serving_name(name, i)
        if deps[i] is not None:
            rt.kube.delete_deployment(namespace, pname, deps[i]["metadata"]["uid"])
        if svcs[i] is not None:
            rt.kube.delete_service(namespace, pname, svcs[i]["metadata"]["uid"])
    log.info("%s/%s: %d part Deployments run artifact %s", *key, count, p.target.sha256[:12])


def remove_parts(
    rt: Runtime, key: ModelKey, model_name: str, uid: str, cur: CompressedModelStatus
) -> None:
    """The model no longer asks for a split (or for a deployment): its part objects go
    (only those it owns); the status' split entry goes with the next write."""
    if cur.split is None:
        return
    for i in range(min(cur.split.parts, MAX_SPLIT_PARTS)):
        pname = part_serving_name(model_name, i)
        delete_serving(rt, key[0], pname, model_name, uid, "split removed")
    write_status(rt, key, lambda c, _b: c.model_copy(update={"split": None}).wire())
