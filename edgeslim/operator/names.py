"""Names, labels and annotations the operator puts on objects: one place, so the
Job builder, the watchers that select by them and the tests cannot drift."""

from __future__ import annotations

from edgeslim.api.base import API_GROUP, API_VERSION, GROUP_VERSION, KIND, PLURAL

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CLEANUP_ANNOTATION",
    "CONTAINER",
    "FINALIZER",
    "GROUP_VERSION",
    "KIND",
    "KUEUE_QUEUE_LABEL",
    "MODEL_LABEL",
    "PLURAL",
    "SPEC_ENV",
    "SPEC_HASH_LABEL",
    "job_name",
    "serving_name",
]

MODEL_LABEL = f"{API_GROUP}/model"
SPEC_HASH_LABEL = f"{API_GROUP}/spec-hash"
# Opt-in: deleting the object also deletes its artifacts from storage.
CLEANUP_ANNOTATION = f"{API_GROUP}/cleanup-artifacts"
FINALIZER = f"{API_GROUP}/cleanup-artifacts"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONTAINER = "compressor"
SPEC_ENV = "EDGESLIM_SPEC"
JOB_CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
SERVING_CONTAINER = "serving"
SERVING_PORT = 8080
# On the serving pod template: which artifact its pods run (a new value = a rollout).
ARTIFACT_SHA_ANNOTATION = f"{API_GROUP}/artifact-sha256"
ARTIFACT_URI_ANNOTATION = f"{API_GROUP}/artifact-uri"
# On the serving Deployment: hash of what the operator last applied, so an
# unchanged manifest costs no write.
APPLIED_HASH_ANNOTATION = f"{API_GROUP}/applied-hash"


def job_name(model_name: str, spec_hash: str) -> str:
    """`<name[:40]>-<hash[:10]>`: the same spec always maps to the same Job, so a
    restarted operator finds (HTTP 409) the Job it already created instead of
    starting a second one. Short enough for the `job-name` pod label (63)."""
    return f"{model_name[:40].rstrip('-')}-{spec_hash[:10]}"


def serving_name(model_name: str) -> str:
    """Deployment and Service of a model: `<name>`, so `kubectl get deploy,svc <name>`
    finds them. A Service name must start with a letter (DNS-1035); a model name
    starting with a digit gets an `m-` prefix."""
    name = model_name if model_name[:1].isalpha() else f"m-{model_name}"
    return name[:63].rstrip("-")
