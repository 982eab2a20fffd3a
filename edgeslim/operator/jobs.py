"""The compressor Job: a pure manifest builder and readers of Job/pod state.

Nothing here talks to the API server; `compression.py` applies what these return.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgeslim.api.spec import CompressedModel
from edgeslim.operator import kueue, podspec, variants
from edgeslim.operator.names import (
    CONTAINER,
    GROUP_VERSION,
    JOB_CONTROLLER_UID_LABEL,
    KIND,
    MODEL_LABEL,
    SPEC_ENV,
    SPEC_HASH_LABEL,
    TARGET_LABEL,
    job_name,
)
from edgeslim.operator.settings import Settings

Obj = dict[str, Any]

# The CLI's exit codes (edgeslim/cli.py): a retry cannot change either outcome.
EXIT_BAD_INPUT = 2
EXIT_REJECTED = 3


def labels(model_name: str, spec_hash: str, target: str = "") -> dict[str, str]:
    out = {
        MODEL_LABEL: model_name,
        SPEC_HASH_LABEL: spec_hash,
        "app.kubernetes.io/name": "edgeslim",
        "app.kubernetes.io/component": "compressor",
        "app.kubernetes.io/managed-by": "edgeslim-operator",
    }
    if target:
        out[TARGET_LABEL] = target
    return out


def target_name(model: CompressedModel) -> str:
    """The target a spec is the effective spec of (exactly one in spec.targets, see
    `variants`), else ""."""
    targets = model.spec.targets or []
    return targets[0].name if len(targets) == 1 else ""


def spec_payload(model: CompressedModel) -> str:
    """The object as the compressor reads it from EDGESLIM_SPEC: the whole resource,
    but only name and namespace of its metadata (no uid, no annotations)."""
    meta = {"name": model.metadata.name}
    if model.metadata.namespace:
        meta["namespace"] = model.metadata.namespace
    body = {
        "apiVersion": GROUP_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": model.spec.wire(),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def build_job(model: CompressedModel, settings: Settings, spec_hash: str) -> Obj:
    """The compressor Job for one spec hash of one CompressedModel."""
    meta = model.metadata
    if not meta.uid or not meta.namespace:
        raise ValueError(
            "build_job needs the object as the API server returned it (uid, namespace)"
        )
    name = job_name(meta.name, spec_hash)
    target = target_name(model)
    job_labels = labels(meta.name, spec_hash, target)
    container: Obj = {
        "name": CONTAINER,
        "image": settings.compressor_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            *settings.compressor_command,
            "compress",
            "--spec-env",
            SPEC_ENV,
            # An optimize search ends with the pick step (operator/fanout.py), which
            # also searches alone when no plan ran (e.g. for a target).
            *(["--pick"] if model.spec.optimize is not None else []),
        ],
        "env": [
            {"name": SPEC_ENV, "value": spec_payload(model)},
            *podspec.base_env(model, settings),
        ],
        "resources": podspec.resources(model.spec.resources),
        # A crash that wrote no result still leaves its log tail in the pod
        # status, where the operator reads it for status.message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": podspec.container_security_context(),
        "volumeMounts": [podspec.scratch_mount()],
    }
    spec: Obj = {
        "backoffLimit": settings.job_backoff_limit,
        "activeDeadlineSeconds": model.spec.active_deadline_seconds,
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "podFailurePolicy": {
            "rules": [
                # Bad input (2) and a rejecting gate (3) give the same answer
                # on every retry: end the Job at once.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_BAD_INPUT, EXIT_REJECTED],
                    },
                },
                # An evicted or preempted pod is not the compressor's fault.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": labels(meta.name, spec_hash, target)},
            "spec": {
                "restartPolicy": "Never",  # retries are the Job's (backoffLimit), not the kubelet's
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": podspec.pod_security_context(),
                "containers": [container],
                "volumes": [
                    podspec.scratch_volume(podspec.compressor_scratch_bytes(model, settings))
                ],
            },
        },
    }
    opt, deployment = model.spec.optimize, model.spec.deployment
    if opt is not None and opt.place_on_deployment_nodes and deployment is not None:
        # Latency decides among candidates: measure it on the node class that serves.
        pod = spec["template"]["spec"]
        if deployment.node_selector:
            pod["nodeSelector"] = dict(deployment.node_selector)
        if deployment.tolerations:
            pod["tolerations"] = [t.wire() for t in deployment.tolerations]
    if target:
        # A target's Job runs on its node class: the latency in its manifest is that
        # hardware's own (for_target merged the class into this placement).
        pod = spec["template"]["spec"]
        place = (model.spec.targets or [])[0]
        pod.pop("nodeSelector", None)
        pod.pop("tolerations", None)
        if place.node_selector:
            pod["nodeSelector"] = dict(place.node_selector)
        if place.tolerations:
            pod["tolerations"] = [t.wire() for t in place.tolerations]
    job: Obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta.namespace,
            "labels": job_labels,
            "ownerReferences": [
                {
                    "apiVersion": GROUP_VERSION,
                    "kind": KIND,
                    "name": meta.name,
                    "uid": meta.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }
    # Under Kueue: suspended, queue-labelled, with a CPU request its quota counts.
    return kueue.queued(job, settings.kueue_queue) if settings.kueue_queue else job


# ------------------------------------------------------------------ reading Jobs


class JobState(StrEnum):
    suspended = "Suspended"
    running = "Running"  # created or running: it holds a slot either way
    succeeded = "Succeeded"
    failed = "Failed"


# A Job in these states holds its object's slot (and its policy's) until it ends.
UNFINISHED = frozenset({JobState.running, JobState.suspended})


def _condition(job: Obj, kind: str) -> Obj | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_state(job: Obj) -> JobState:
    # Complete/Failed, not SuccessCriteriaMet/FailureTarget: those come first,
    # while pods may still be terminating, and the result must be final.
    if _condition(job, "Complete"):
        return JobState.succeeded
    if _condition(job, "Failed"):
        return JobState.failed
    if (job.get("spec") or {}).get("suspend"):
        return JobState.suspended
    return JobState.running


def failure_reason(job: Obj) -> str:
    """The Job controller's reason: BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy."""
    cond = _condition(job, "Failed")
    return str((cond or {}).get("reason") or "Failed")


def duration_seconds(job: Obj) -> float | None:
    from datetime import datetime

    status = job.get("status") or {}
    start = status.get("startTime")
    end = status.get("completionTime") or (_condition(job, "Failed") or {}).get(
        "lastTransitionTime"
    )
    if not start or not end:
        return None
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return max(0.0, (datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds())


@dataclass(frozen=True)
class JobRef:
    """Who a Job belongs to, read from its labels and owner reference."""

    namespace: str
    name: str
    uid: str
    model: str
    spec_hash: str
    owner_uid: str | None
    target: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """The key of the object (or of its target, see `variants`) the Job is for."""
        return variants.variant_key(self.namespace, self.model, self.target)

    @classmethod
    def of(cls, job: Obj) -> JobRef:
        meta = job["metadata"]
        labels_ = meta.get("labels") or {}
        owner = next(
            (
                o
                for o in meta.get("ownerReferences") or []
                if o.get("controller") and o.get("kind") == KIND
            ),
            None,
        )
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            model=labels_.get(MODEL_LABEL, ""),
            spec_hash=labels_.get(SPEC_HASH_LABEL, ""),
            owner_uid=(owner or {}).get("uid"),
            target=labels_.get(TARGET_LABEL, ""),
        )


def pod_selector(job_uid: str) -> str:
    """Pods of exactly this Job object, not of an older Job that had its name."""
    return f"{JOB_CONTROLLER_UID_LABEL}={job_uid}"


@dataclass(frozen=True)
class Termination:
    """How the compressor container of one pod ended."""

    pod: str
    exit_code: int
    message: str
    finished_at: str


def terminations(pods: list[Obj], job_uid: str) -> list[Termination]:
    """Terminated compressor containers of the Job's pods, oldest first.

    Pods not owned by the Job (by uid) are ignored: a result is only read from
    a pod that provably ran for this Job.
    """
    found = []
    for pod in pods:
        owners = (pod.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == job_uid and o.get("kind") == "Job" for o in owners):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == CONTAINER and term:
                found.append(
                    Termination(
                        pod=pod["metadata"]["name"],
                        exit_code=int(term.get("exitCode", -1)),
                        message=term.get("message") or "",
                        finished_at=term.get("finishedAt") or "",
                    )
                )
    return sorted(found, key=lambda t: (t.finished_at, t.pod))
