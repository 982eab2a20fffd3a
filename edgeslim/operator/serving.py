"""Edge serving: pure builders of the Deployment and Service, a reader of a
Deployment's rollout, and the decision what to roll out next.

Nothing here talks to the API server; `rollout.py` applies what these return.

How a rollout is decided (`plan`):

* The *candidate* is the artifact of the current spec hash, once it passed the
  gate. A rejected artifact never is one, so it is never deployed.
* A Deployment whose template runs the candidate and whose controller reports
  `Progressing=False / ProgressDeadlineExceeded` failed: the candidate goes
  into `status.failedArtifacts` (with the spec hash that produced it) and the
  Deployment goes back to `status.lastGoodArtifact`. A failed candidate is not
  rolled out again until the spec changes to another hash.
* Whatever a Deployment rolled out completely is good: it becomes
  `status.lastGoodArtifact` and `status.servingArtifact`.

The state lives in the object's status (last good, failed) and in the
Deployment itself (which artifact its template runs, what its controller says
about the rollout): both survive an operator restart, and the decision is a
pure function of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edgeslim import logs
from edgeslim.api.spec import CompressedModel, DeploymentSpec
from edgeslim.api.status import (
    MAX_FAILED_ARTIFACTS,
    CompressedModelStatus,
    ConditionType,
    FailedArtifact,
    Phase,
    ServedArtifact,
)
from edgeslim.operator import events, jobs, podspec
from edgeslim.operator.names import (
    APPLIED_HASH_ANNOTATION,
    ARTIFACT_SHA_ANNOTATION,
    ARTIFACT_URI_ANNOTATION,
    GROUP_VERSION,
    KIND,
    MODEL_LABEL,
    SERVING_CONTAINER,
    SERVING_PORT,
    TARGET_LABEL,
    serving_name,
)
from edgeslim.operator.settings import Settings
from edgeslim.operator.status import MESSAGE_LIMIT, set_condition, set_progress

Obj = dict[str, Any]
# The server's probe listener (`edgeslim serve --health-port`): health routes only,
# with its own connection cap, so a flood of clients on 8080 cannot fail the probes.
HEALTH_PORT = 8081
DEADLINE_REASON = "ProgressDeadlineExceeded"
# A canary's analysis failed (operator/canary.py).
CANARY_REASON = "CanaryAnalysis"
# The candidate's bytes in storage are not the bytes that passed the gate.
CORRUPTED_REASON = "ArtifactCorrupted"
# The server drains in-flight requests for up to 30 s on SIGTERM (edgeslim serve
# --graceful-timeout); the kubelet must wait a little longer before SIGKILL.
GRACE_SECONDS = 35


# ------------------------------------------------------------------ builders


def selector_labels(model_name: str, target: str = "") -> dict[str, str]:
    """The Deployment's selector (immutable) and the Service's: model + component
    (+ target for a spec.targets entry, so each node class has its own pods)."""
    out = {MODEL_LABEL: model_name, "app.kubernetes.io/component": "serving"}
    if target:
        out[TARGET_LABEL] = target
    return out


def labels(model_name: str, target: str = "") -> dict[str, str]:
    return {
        **selector_labels(model_name, target),
        "app.kubernetes.io/name": "edgeslim",
        "app.kubernetes.io/instance": model_name,
        "app.kubernetes.io/managed-by": "edgeslim-operator",
    }


def owner_reference(model: CompressedModel) -> Obj:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": KIND,
        "name": model.metadata.name,
        "uid": model.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _deployment_spec(model: CompressedModel) -> DeploymentSpec:
    if model.spec.deployment is None:
        raise ValueError(f"{model.metadata.name} has no spec.deployment")
    return model.spec.deployment


def _env(model: CompressedModel, settings: Settings) -> list[Obj]:
    # Each replica binds its own pod IP, not every interface.
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    env = [pod_ip, *podspec.base_env(model, settings)]
    if settings.log_format != logs.TEXT:
        # Only when asked: an unchanged default leaves running Deployments' templates alone.
        env.append({"name": logs.LOG_FORMAT_ENV, "value": settings.log_format})
    return env


def _probe(path: str, period: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def applied_hash(manifest: Obj) -> str:
    """Content hash of a manifest as built (before the annotation that carries it)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def build_deployment(model: CompressedModel, artifact: ServedArtifact, settings: Settings) -> Obj:
    """The edge-serving Deployment of `model`, running `artifact`."""
    meta = model.metadata
    if not meta.uid or not meta.namespace:
        raise ValueError(
            "build_deployment needs the object as the API server returned it (uid, namespace)"
        )
    spec = _deployment_spec(model)
    target = jobs.target_name(model)
    command = [
        *settings.serving_command,
        "serve",
        "--model",
        artifact.uri,
        "--sha256",
        artifact.sha256,
        "--name",
        meta.name,
        "--port",
        str(SERVING_PORT),
        "--health-port",
        str(HEALTH_PORT),
        "--host",
        "$(POD_IP)",
        "--threads",
        str(spec.threads),
    ]
    container: Obj = {
        "name": SERVING_CONTAINER,
        "image": settings.serving_image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": _env(model, settings),
        "ports": [
            {"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        # Ready only once the model is fetched, verified and loaded: a model that
        # cannot load keeps its pod unready, and the rollout stops there.
        "readinessProbe": _probe("/v2/health/ready", 2, 3),
        "livenessProbe": {**_probe("/v2/health/live", 10, 3), "initialDelaySeconds": 10},
        "resources": podspec.resources(spec.resources),
        "securityContext": podspec.container_security_context(),
        "volumeMounts": [podspec.scratch_mount()],
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": podspec.pod_security_context(),
        "containers": [container],
        "volumes": [podspec.scratch_volume(podspec.serving_scratch_bytes(settings))],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in spec.tolerations]
    artifact_annotations = {
        ARTIFACT_SHA_ANNOTATION: artifact.sha256,
        ARTIFACT_URI_ANNOTATION: artifact.uri,
    }
    manifest: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": serving_name(meta.name, target),
            "namespace": meta.namespace,
            "labels": labels(meta.name, target),
            "annotations": dict(artifact_annotations),
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(meta.name, target)},
            # The controller marks the rollout failed after this; the operator
            # then rolls back to the last good artifact.
            "progressDeadlineSeconds": spec.progress_deadline_seconds,
            "revisionHistoryLimit": 3,
            # Never fewer ready replicas than asked for: an old pod goes only
            # once a new one is ready, so an artifact that cannot load takes
            # nothing down.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": labels(meta.name, target),
                    "annotations": artifact_annotations,
                },
                "spec": pod_spec,
            },
        },
    }
    manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = applied_hash(manifest)
    return manifest


def build_service(model: CompressedModel) -> Obj:
    """ClusterIP Service on port 8080 in front of the model's serving pods."""
    meta = model.metadata
    target = jobs.target_name(model)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": serving_name(meta.name, target),
            "namespace": meta.namespace,
            "labels": labels(meta.name, target),
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(meta.name, target),
            "ports": [
                {"name": "http", "port": SERVING_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


# ------------------------------------------------------------ reading a rollout


class Rollout(StrEnum):
    absent = "Absent"
    progressing = "Progressing"
    complete = "Complete"
    failed = "Failed"  # the controller gave up: ProgressDeadlineExceeded


@dataclass(frozen=True)
class RolloutState:
    """What a serving Deployment runs and how far its rollout got."""

    rollout: Rollout
    artifact: ServedArtifact | None = None
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    applied_hash: str | None = None
    owner_uid: str | None = None
    message: str = ""


def _condition(status: Obj, kind: str) -> Obj | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def rollout_state(deployment: Obj | None) -> RolloutState:
    """Reads a Deployment like `kubectl rollout status` does, trusting its status
    only once the controller has observed the current generation."""
    if deployment is None:
        return RolloutState(Rollout.absent)
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    st = deployment.get("status") or {}
    template_ann = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    sha, uri = template_ann.get(ARTIFACT_SHA_ANNOTATION), template_ann.get(ARTIFACT_URI_ANNOTATION)
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    replicas = int(spec.get("replicas", 1))
    common: Obj = {
        "artifact": ServedArtifact(uri=uri, sha256=sha) if sha and uri else None,
        "replicas": replicas,
        "ready_replicas": int(st.get("readyReplicas") or 0),
        "updated_replicas": int(st.get("updatedReplicas") or 0),
        "applied_hash": (meta.get("annotations") or {}).get(APPLIED_HASH_ANNOTATION),
        "owner_uid": (owner or {}).get("uid"),
    }
    if int(st.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return RolloutState(Rollout.progressing, **common)
    progressing = _condition(st, "Progressing")
    if (
        progressing is not None
        and progressing.get("status") == "False"
        and progressing.get("reason") == DEADLINE_REASON
    ):
        return RolloutState(Rollout.failed, message=progressing.get("message") or "", **common)
    done = (
        int(st.get("updatedReplicas") or 0) == replicas
        and int(st.get("replicas") or 0) == replicas
        and int(st.get("availableReplicas") or 0) == replicas
    )
    return RolloutState(Rollout.complete if done else Rollout.progressing, **common)


# ------------------------------------------------------------------ decision


@dataclass(frozen=True)
class Plan:
    """What to run and what the status says about serving.

    `phase` None: the serving side has no say on the phase (the compression of
    the current spec is not through the gate); only the serving fields change.
    """

    target: ServedArtifact | None
    phase: Phase | None = None
    available: str | None = None  # Available condition status; None = leave it
    reason: str = ""
    message: str = ""
    serving: str | None = None
    ready_replicas: int | None = None
    last_good: ServedArtifact | None = None
    failed: tuple[FailedArtifact, ...] = field(default_factory=tuple)
    event: tuple[str, str, str] | None = None  # (type, reason, message) to post now


def candidate(status: CompressedModelStatus, spec_hash: str) -> ServedArtifact | None:
    """The current spec's artifact, if it passed the gate; else None."""
    if status.spec_hash != spec_hash or status.artifact is None:
        return None
    if status.phase not in (Phase.deploying, Phase.ready, Phase.failed):
        return None
    gate = next((c for c in status.conditions if c.type == ConditionType.gate_passed), None)
    if gate is None or gate.status != "True":
        return None
    return ServedArtifact(
        uri=status.artifact.uri, sha256=status.artifact.sha256, parts=status.artifact.parts
    )


def is_failed(
    failed: tuple[FailedArtifact, ...] | list[FailedArtifact],
    sha256: str,
    spec_hash: str,
    reason: str | None = None,
) -> bool:
    return any(
        f.sha256 == sha256 and f.spec_hash == spec_hash and reason in (None, f.reason)
        for f in failed
    )


def needs_storage_check(
    status: CompressedModelStatus, spec_hash: str, state: RolloutState, target: ServedArtifact
) -> bool:
    """Whether `target` is the candidate about to reach a Deployment for the first
    time: its bytes in storage must be checked against its sha256 first.

    Checked once, before the template changes: bytes that changed after the gate
    would otherwise only show as pods that never get ready, and only after
    progressDeadlineSeconds. Once a Deployment runs it, the pods' own sha check
    (edgeslim serve --sha256) guards every later start.
    """
    cand = candidate(status, spec_hash)
    running = state.artifact.sha256 if state.artifact else None
    return cand is not None and target.sha256 == cand.sha256 and running != cand.sha256


def mark_corrupted(
    status: CompressedModelStatus, spec_hash: str, artifact: ServedArtifact
) -> CompressedModelStatus:
    """`status` with `artifact` recorded as failed (ArtifactCorrupted) for `spec_hash`,
    so that `plan` never rolls it out and keeps what runs."""
    if is_failed(status.failed_artifacts, artifact.sha256, spec_hash, CORRUPTED_REASON):
        return status
    entry = FailedArtifact(sha256=artifact.sha256, spec_hash=spec_hash, reason=CORRUPTED_REASON)
    failed = [*status.failed_artifacts, entry][-MAX_FAILED_ARTIFACTS:]
    return status.model_copy(update={"failed_artifacts": failed})


def _short(sha: str) -> str:
    return sha[:12]


def plan(status: CompressedModelStatus, spec_hash: str, state: RolloutState) -> Plan:
    """The next step for a model with spec.deployment, from its status and its Deployment."""
    deployed = state.artifact
    complete = state.rollout is Rollout.complete and deployed is not None
    last_good = deployed if complete else status.last_good_artifact
    failed = tuple(status.failed_artifacts)
    common: Obj = {
        "serving": last_good.sha256 if last_good and state.rollout is not Rollout.absent else None,
        "ready_replicas": state.ready_replicas,
        "last_good": last_good,
        "failed": failed,
    }
    cand = candidate(status, spec_hash)

    if cand is None:
        # Compressing, rejected or failed: keep serving what runs (a rejected
        # artifact never gets here), or the last good one if the Deployment went.
        return Plan(target=deployed or last_good, **common)

    if (
        state.rollout is Rollout.failed
        and deployed is not None
        and deployed.sha256 == cand.sha256
        and last_good is not None
        and last_good.sha256 == cand.sha256
    ):
        # The artifact served before; the change that stalled is the Deployment's
        # own (more replicas than nodes take, bigger requests): nothing to roll
        # back to and nothing wrong with the artifact.
        return Plan(
            target=cand,
            phase=Phase.failed,
            available="False",
            reason="RolloutStalled",
            message=f"the Deployment made no progress within progressDeadlineSeconds "
            f"({state.message}); artifact {_short(cand.sha256)} still serves on "
            f"{state.ready_replicas} of {state.replicas} replicas",
            **common,
        )

    event = None
    if (
        state.rollout is Rollout.failed
        and deployed is not None
        and deployed.sha256 == cand.sha256
        and not is_failed(failed, cand.sha256, spec_hash)
    ):
        failed = (
            *failed,
            FailedArtifact(sha256=cand.sha256, spec_hash=spec_hash, reason=DEADLINE_REASON),
        )
        failed = failed[-MAX_FAILED_ARTIFACTS:]
        common["failed"] = failed
        back = (
            f"rolling back to {_short(last_good.sha256)}"
            if last_good
            else "nothing to roll back to"
        )
        event = (
            "Warning",
            DEADLINE_REASON,
            f"artifact {_short(cand.sha256)} not ready in time ({state.message}); {back}"[:1024],
        )

    if is_failed(failed, cand.sha256, spec_hash, CORRUPTED_REASON):
        # Caught before any Deployment ran it: whatever runs keeps running.
        keep = next((a for a in (deployed, last_good) if a and a.sha256 != cand.sha256), None)
        serves = f"; {_short(keep.sha256)} keeps serving" if keep else ""
        return Plan(
            target=keep,
            phase=Phase.failed,
            available="False",
            reason=CORRUPTED_REASON,
            message=f"artifact {_short(cand.sha256)} in storage does not match the sha256 "
            f"that passed the gate; it was never rolled out{serves}; it is not rolled out "
            "until the spec changes",
            **common,
        )

    if is_failed(failed, cand.sha256, spec_hash):
        never = "it is not rolled out again until the spec changes"
        why = _why_failed(failed, cand.sha256, spec_hash)
        if last_good is None or last_good.sha256 == cand.sha256:
            # No earlier artifact: the unready pods stay for `kubectl logs`.
            return Plan(
                target=deployed or cand,
                phase=Phase.failed,
                available="False",
                reason="RolloutFailed",
                message=f"artifact {_short(cand.sha256)} {why} and no earlier artifact was "
                f"served; {never}",
                event=event,
                **common,
            )
        # A canary's stable Deployment never stopped running the last good artifact:
        # scaling it back to all replicas is not a rollback still under way.
        canary_failed = is_failed(failed, cand.sha256, spec_hash, CANARY_REASON)
        back_done = (
            (complete or canary_failed)
            and deployed is not None
            and deployed.sha256 == last_good.sha256
        )
        return Plan(
            target=last_good,
            phase=Phase.failed if back_done else Phase.deploying,
            available="False",
            reason="RolledBack" if back_done else "RollingBack",
            message=f"artifact {_short(cand.sha256)} {why}; "
            f"{'rolled' if back_done else 'rolling'} back to "
            f"{_short(last_good.sha256)}; {never}",
            event=event,
            **common,
        )

    if complete and deployed is not None and deployed.sha256 == cand.sha256:
        return Plan(
            target=cand,
            phase=Phase.ready,
            available="True",
            reason="RolloutComplete",
            message=f"{state.replicas} replicas serve artifact {_short(cand.sha256)}",
            **common,
        )
    serving_now = f"; {_short(last_good.sha256)} serves meanwhile" if last_good else ""
    return Plan(
        target=cand,
        phase=Phase.deploying,
        available="False",
        reason="RollingOut",
        message=f"rolling out artifact {_short(cand.sha256)}: {state.updated_replicas} of "
        f"{state.replicas} pods updated, {state.ready_replicas} ready{serving_now}",
        **common,
    )


def _why_failed(failed: tuple[FailedArtifact, ...], sha256: str, spec_hash: str) -> str:
    """What a failed artifact's entry says went wrong (a canary's analysis carries its own)."""
    entry = next(f for f in reversed(failed) if f.sha256 == sha256 and f.spec_hash == spec_hash)
    if entry.reason == DEADLINE_REASON or not entry.message:
        return "did not become ready within progressDeadlineSeconds"
    return f"was rolled back ({entry.reason}: {entry.message})"


def name_conflict(status: CompressedModelStatus, message: str) -> Plan:
    """Another owner's Deployment or Service holds the serving name: Failed with
    reason NameConflict, touching nothing. The compression result stays
    (artifact, GatePassed), so a later retry rolls it out once the name is free."""
    return Plan(
        target=None,
        phase=Phase.failed,
        available="False",
        reason="NameConflict",
        message=message,
        serving=status.serving_artifact,
        ready_replicas=status.ready_replicas,
        last_good=status.last_good_artifact,
        failed=tuple(status.failed_artifacts),
    )


_READY = {Phase.ready: "True", Phase.deploying: "Unknown", Phase.failed: "False"}


def apply_plan(current: CompressedModelStatus, generation: int | None, p: Plan, at: str) -> Obj:
    """The whole new status (wire form) after `p`."""
    update: Obj = {
        "serving_artifact": p.serving,
        "ready_replicas": p.ready_replicas,
        "last_good_artifact": p.last_good,
        "failed_artifacts": list(p.failed),
    }
    if p.phase is not None and p.available is not None:
        conds = set_condition(
            list(current.conditions),
            ConditionType.ready,
            _READY[p.phase],
            p.reason,
            p.message,
            generation,
            at,
        )
        conds = set_condition(
            conds, ConditionType.available, p.available, p.reason, p.message, generation, at
        )
        conds = set_progress(conds, p.phase, p.reason, p.message, generation, at)
        update |= {
            "phase": p.phase,
            "observed_generation": generation,
            "message": p.message[:MESSAGE_LIMIT] or None,
            "conditions": conds,
        }
    return current.model_copy(update=update).wire()


def events_for(old: CompressedModelStatus, p: Plan) -> list[tuple[str, str, str]]:
    """Events to post once `p` is written: the rollback decision and a phase change."""
    out = [p.event] if p.event else []
    if p.phase is not None:
        change = events.for_transition(old.phase, p.phase, p.reason, p.message)
        if change:
            out.append(change)
    return out


def rollout_result(old: CompressedModelStatus, p: Plan) -> str | None:
    """How a rollout ended, once, when `p` is written over `old` (a value of
    metrics.ROLLOUT_RESULTS), or None when `p` ends none. A rollback is seen once:
    `plan` sets `event` only when it first records the failed artifact."""
    if p.event is not None and p.reason in ("RollingBack", "RolledBack"):
        return "rolled_back"
    if p.event is not None and p.reason == "RolloutFailed":
        return "failed"
    if p.reason == "RolloutComplete" and (
        old.phase is not Phase.ready or old.serving_artifact != p.serving
    ):
        return "complete"
    return None


def without_deployment(current: CompressedModelStatus, generation: int | None, at: str) -> Obj:
    """spec.deployment removed: no serving fields, no Available condition; an
    object that was deploying or rolled back is Ready with its compressed artifact."""
    conds = [c for c in current.conditions if c.type != ConditionType.available]
    update: Obj = {
        "serving_artifact": None,
        "ready_replicas": None,
        "last_good_artifact": None,
        "failed_artifacts": [],
        "conditions": conds,
    }
    rollout_phase = current.phase is Phase.deploying or (
        current.phase is Phase.failed
        and any(c.type == ConditionType.available for c in current.conditions)
    )
    if rollout_phase:
        message = current.artifact.uri if current.artifact else ""
        update |= {
            "phase": Phase.ready,
            "observed_generation": generation,
            "message": message or None,
            "conditions": set_progress(
                set_condition(
                    conds, ConditionType.ready, "True", "GatePassed", message, generation, at
                ),
                Phase.ready,
                "GatePassed",
                message,
                generation,
                at,
            ),
        }
    return current.model_copy(update=update).wire()
