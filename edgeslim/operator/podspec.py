"""Pod pieces the compressor Job and the serving Deployment share.

Both run edgeslim images under the Pod Security Standards "restricted"
profile, read S3 credentials from the Secret the spec names (by reference:
the keys never appear in a manifest) and no others, and write only to a /tmp
emptyDir whose size is bounded by the download limit.
"""

from __future__ import annotations

from typing import Any

from edgeslim.api.spec import CompressedModel, ResourceRequirements
from edgeslim.operator.settings import Settings
from edgeslim.storage.limits import MAX_BYTES_ENV

Obj = dict[str, Any]

NONROOT_UID = 65532  # the distroless "nonroot" user the images run as

# Secret keys handed to pods; the two optional ones may be absent.
SECRET_KEYS: tuple[tuple[str, bool], ...] = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_ENDPOINT_URL", True),
    ("AWS_REGION", True),
)


# Files besides the downloads that the compressor keeps in scratch at once:
# the model a step reads and the one it writes (each at most a download's size).
WORKING_COPIES = 2
# The serving pod holds one artifact, plus a second while a fetch is staged.
SERVING_COPIES = 2


def quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity, in the largest binary unit that divides them."""
    for unit, size in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def compressor_scratch_bytes(model: CompressedModel, settings: Settings) -> int:
    """What the compressor's /tmp may hold: the source, every distinct dataset the
    spec names and the working copies of the model, each at most one download
    limit. Past that the kubelet evicts the pod instead of filling the node."""
    if settings.compressor_scratch_bytes > 0:
        return settings.compressor_scratch_bytes
    datasets = {model.spec.evaluation.dataset}
    if model.spec.optimize is not None and model.spec.optimize.train_dataset:
        datasets.add(model.spec.optimize.train_dataset)
    for step in model.spec.pipeline or []:
        if step.distill is not None:
            datasets.add(step.distill.dataset)
        if step.quantize is not None and step.quantize.calibration_dataset:
            datasets.add(step.quantize.calibration_dataset)
        if step.prune is not None and step.prune.calibration_dataset:
            datasets.add(step.prune.calibration_dataset)
    return settings.max_download_bytes * (1 + len(datasets) + WORKING_COPIES)


def serving_scratch_bytes(settings: Settings) -> int:
    if settings.serving_scratch_bytes > 0:
        return settings.serving_scratch_bytes
    return settings.max_download_bytes * SERVING_COPIES


def scratch_volume(size_bytes: int) -> Obj:
    return {"name": "tmp", "emptyDir": {"sizeLimit": quantity(size_bytes)}}


def scratch_mount() -> Obj:
    return {"name": "tmp", "mountPath": "/tmp"}


def base_env(model: CompressedModel, settings: Settings) -> list[Obj]:
    """Scratch-space variables, the download limit and the credentials Secret, by
    reference. Without a Secret the pod gets no credentials: nothing of the
    operator's, and (unless `inherit_storage_credentials`) not the node's cloud
    role either, which boto3 would otherwise find through instance metadata."""
    env: list[Obj] = [
        # The root file system is read-only: scratch space is the /tmp emptyDir.
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HOME", "value": "/tmp"},
        # The same limit the scratch size is derived from.
        {"name": MAX_BYTES_ENV, "value": str(settings.max_download_bytes)},
    ]
    if not settings.inherit_storage_credentials:
        env.append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    secret = model.spec.source.credentials_secret
    if secret:
        for key, optional in SECRET_KEYS:
            ref: Obj = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def resources(res: ResourceRequirements | None) -> Obj:
    out: Obj = {}
    if res is not None and res.requests:
        out["requests"] = {k: str(v) for k, v in res.requests.items()}
    if res is not None and res.limits:
        out["limits"] = {k: str(v) for k, v in res.limits.items()}
    return out


def container_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": NONROOT_UID,
        "runAsGroup": NONROOT_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": NONROOT_UID,
        "runAsGroup": NONROOT_UID,
        "fsGroup": NONROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
