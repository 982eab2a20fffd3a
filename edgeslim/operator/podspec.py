"""Pod pieces the compressor Job and the serving Deployment share.

Both run edgeslim images under the Pod Security Standards "restricted"
profile, read S3 credentials from the Secret the spec names (by reference:
the keys never appear in a manifest), and write only to a /tmp emptyDir.
"""

from __future__ import annotations

from typing import Any

from edgeslim.api.spec import CompressedModel, ResourceRequirements

Obj = dict[str, Any]

NONROOT_UID = 65532  # the distroless "nonroot" user the images run as

# Secret keys handed to pods; the two optional ones may be absent.
SECRET_KEYS: tuple[tuple[str, bool], ...] = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_ENDPOINT_URL", True),
    ("AWS_REGION", True),
)


def scratch_volume() -> Obj:
    return {"name": "tmp", "emptyDir": {}}


def scratch_mount() -> Obj:
    return {"name": "tmp", "mountPath": "/tmp"}


def base_env(model: CompressedModel) -> list[Obj]:
    """Scratch-space variables plus the credentials Secret, by reference."""
    env: list[Obj] = [
        # The root file system is read-only: scratch space is the /tmp emptyDir.
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HOME", "value": "/tmp"},
    ]
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
