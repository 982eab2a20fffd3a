"""Names, labels and annotations the operator puts on objects: one place, so the
Job builder, the watchers that select by them and the tests cannot drift."""

from __future__ import annotations

import hashlib

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
    "PART_LABEL",
    "PLURAL",
    "SPEC_ENV",
    "SPEC_HASH_LABEL",
    "STEP_LABEL",
    "TARGET_LABEL",
    "job_name",
    "part_serving_name",
    "serving_name",
]

MODEL_LABEL = f"{API_GROUP}/model"
SPEC_HASH_LABEL = f"{API_GROUP}/spec-hash"
# On an optimize search's plan and candidate Jobs (`plan`, `candidate`): steps whose
# result is in storage, not a CompressedModel's result (the pick Job has none).
STEP_LABEL = f"{API_GROUP}/step"
# On a spec.targets entry's Job, serving Deployment, Service and pods: which target.
TARGET_LABEL = f"{API_GROUP}/target"
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


# Kubernetes' limit for label values and DNS-1123/1035 labels; a Job's name
# becomes its pods' `job-name` label, so it must fit one too.
NAME_LIMIT = 63
# Longest model name a Job name keeps whole: with `-<spec hash[:10]>` it
# fills at most 51 characters, shorter than any truncated name (62), so a kept
# name and a truncated one can never meet.
JOB_NAME_KEEPS = 40
_DIGEST_CHARS = 10


def _digest(*parts: str) -> str:
    """A short, stable digest of the full, untruncated inputs."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:_DIGEST_CHARS]


def job_name(model_name: str, spec_hash: str, revision: str | None = None) -> str:
    """`<name>-<hash[:10]>`: the same spec always maps to the same Job, so a
    restarted operator finds (HTTP 409) the Job it already created instead of
    starting a second one.

    A re-compression of the same spec (its source replaced at the same URI, or a
    new compressor; see `source_watch`) is named after what changed as well:
    `<name>-<hash[:10]>-<revision[:6]>`, again the same for the same change, and
    never equal to a name without one (its last part has 6 characters, not 10).

    A name longer than 40 characters keeps its first 40 for reading and gains a
    digest of the *whole* name and spec hash: two names that differ only past
    character 40 (`...-prod-a`, `...-prod-b`) get different Jobs. 62 characters
    at most, within the 63 of the pods' `job-name` label. Children live in
    the object's namespace, so the namespace need not be in the name.
    """
    if len(model_name) <= JOB_NAME_KEEPS:
        tail = f"-{revision[:6]}" if revision else ""
        return f"{model_name}-{spec_hash[:10]}{tail}"
    # A label may hold `--` inside it, so no rstrip: stripping would let
    # `x-` and `x` (as truncated prefixes) meet. A revision goes into the digest.
    digest = _digest(model_name, spec_hash, *([revision] if revision else []))
    return f"{model_name[:JOB_NAME_KEEPS]}-{digest}-{spec_hash[:10]}"


def serving_name(model_name: str, target: str = "") -> str:
    """Deployment and Service of a model: `<name>`, so `kubectl get deploy,svc <name>`
    finds them.

    A Service name must start with a letter (DNS-1035): a model name starting
    with a digit gets an `m-` prefix, and when that no longer fits 63
    characters, its first 50 plus a digest of the whole name, so two such names
    that differ only at the end stay apart. (A model deliberately named like
    another's serving name, e.g. `m-3d` next to `3d`, is the one case a name
    cannot rule out: the operator then refuses to touch the other's objects,
    see `ownership`.)
    """
    if target:
        return target_serving_name(model_name, target)
    if model_name[:1].isalpha():
        return model_name  # a model name is a DNS label of at most 63 already
    prefixed = f"m-{model_name}"
    if len(prefixed) <= NAME_LIMIT:
        return prefixed
    return f"m-{model_name[:50]}-{_digest(model_name)}"


# On a split model's part Deployments, Services and pods: the part's index.
PART_LABEL = f"{API_GROUP}/part"


def part_serving_name(model_name: str, index: int) -> str:
    """Deployment and Service of part `index` of a split model: `<serving name>-part-<i>`.

    Past 63 characters, the serving name's first 45 plus a digest of the whole model
    name, like `serving_name`, so two long names that differ only at the end stay apart.
    """
    tail = f"-part-{index}"
    head = serving_name(model_name)
    if len(head) + len(tail) <= NAME_LIMIT:
        return head + tail
    return f"{head[:45]}-{_digest(model_name)}{tail}"


def target_serving_name(model_name: str, target: str) -> str:
    """Deployment and Service of one spec.targets entry: `<name>-<target>`, so
    `kubectl get deploy` lists a model's node classes side by side.

    Like `serving_name`: an `m-` prefix when the name starts with a digit, and past
    63 characters its first 50 plus a digest of model *and* target, so two long
    names that differ only at the end stay apart. `<name>-<target>` can equal
    another object's serving name (model `a-b` beside model `a`'s target `b`); as
    for `serving_name`, ownership then refuses to touch the other's objects.
    """
    whole = f"{model_name}-{target}"
    head = whole if whole[:1].isalpha() else f"m-{whole}"
    if len(head) <= NAME_LIMIT:
        return head
    return f"{head[:50]}-{_digest(model_name, target)}"
