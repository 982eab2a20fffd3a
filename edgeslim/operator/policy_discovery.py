"""A CompressionPolicy's `spec.discover`: one CompressedModel per model file under
an object-store prefix, so adding `<name>.onnx` and `<name>.val.npz` to the
bucket is all a team does.

The pure part turns a listing into model objects; `discover` lists the prefix
with the Secret the policy names and creates the models that do not exist yet
(a 409 leaves an existing one untouched: the team may have edited it). It runs
when the policy changes and then every `intervalSeconds` from the resync loop.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time

from edgeslim import metrics, storage
from edgeslim.api.base import API_GROUP, API_VERSION, KIND
from edgeslim.api.crd import MAX_NAME_LENGTH
from edgeslim.api.policy import POLICY_KIND, CompressionPolicy
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.operator import policy
from edgeslim.operator.runtime import Obj, Runtime, post_event

log = logging.getLogger("edgeslim.operator")

MODEL_SUFFIX = ".onnx"
DISCOVERED_BY = f"{API_GROUP}/discovered-by"
DISCOVERED_FROM = f"{API_GROUP}/discovered-from"
_DIGEST = 10

# When each policy's prefix was last scanned (monotonic seconds).
_scanned: dict[policy.PolicyKey, float] = {}
_scanned_lock = threading.Lock()


def model_name(relative: str) -> str:
    """A DNS-1123 name for the model file at `relative` (under the prefix, without
    `.onnx`): `vision/Digits_CNN` -> `vision-digits-cnn`. A name that had to be
    cut, or had nothing left, ends in a hash of the whole path, so two files
    never share a name."""
    name = re.sub(r"[^a-z0-9]+", "-", relative.lower()).strip("-")
    if name and len(name) <= MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha256(relative.encode()).hexdigest()[:_DIGEST]
    keep = name[: MAX_NAME_LENGTH - _DIGEST - 1].strip("-")
    return f"{keep}-{digest}" if keep else f"m-{digest}"


def pairs(prefix: str, uris: list[str], dataset_suffix: str) -> list[tuple[str, str, str]]:
    """(name, model uri, dataset uri) for each `.onnx` under `prefix` whose dataset
    lies beside it, sorted by name."""
    base = prefix if prefix.endswith("/") else prefix + "/"
    present = set(uris)
    out = []
    for uri in uris:
        if not uri.endswith(MODEL_SUFFIX) or not uri.startswith(base):
            continue
        stem = uri[: -len(MODEL_SUFFIX)]
        dataset = stem + dataset_suffix
        if dataset in present:
            out.append((model_name(stem[len(base) :]), uri, dataset))
    return sorted(out)


def model_body(
    pol: CompressionPolicy, uid: str, name: str, model_uri: str, dataset_uri: str
) -> Obj:
    """The CompressedModel a discovered file becomes: its own source, dataset and
    output, the rest from the policy that selects it by its matchLabels."""
    d = pol.spec.discover
    assert d is not None
    source: Obj = {"uri": model_uri}
    if d.credentials_secret:
        source["credentialsSecret"] = d.credentials_secret
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": pol.metadata.namespace,
            "labels": {**pol.spec.selector.match_labels, DISCOVERED_BY: pol.metadata.name},
            "annotations": {DISCOVERED_FROM: model_uri},
            # Owned by the policy: deleting it deletes the models it created.
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": POLICY_KIND,
                    "name": pol.metadata.name,
                    "uid": uid,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "source": source,
            "evaluation": {"dataset": dataset_uri},
            "output": d.output.wire(),
        },
    }


def due(entry: policy.PolicyEntry, now: float) -> bool:
    """True when the policy discovers and its prefix was not scanned within its interval."""
    if entry.policy is None or entry.policy.spec.discover is None:
        return False
    with _scanned_lock:
        last = _scanned.get(entry.key)
    return last is None or now - last >= entry.policy.spec.discover.interval_seconds


def discover(rt: Runtime, entry: policy.PolicyEntry) -> int:
    """Scans the policy's prefix and creates the missing models; returns how many
    were created. Storage and bad-input problems become a Warning Event on the
    policy (the next scan tries again)."""
    pol = entry.policy
    if pol is None or pol.spec.discover is None:
        return 0
    d = pol.spec.discover
    body = entry.reference()
    with _scanned_lock:
        _scanned[entry.key] = time.monotonic()
    try:
        env: dict[str, str] = {}
        if d.credentials_secret:
            data = rt.kube.read_secret(entry.namespace, d.credentials_secret)
            if data is None:
                raise BadInput(f"Secret {d.credentials_secret} (spec.discover) not found")
            env = {k: v for k, v in data.items() if k.startswith("AWS_")}
        elif not rt.settings.inherit_storage_credentials:
            raise BadInput("spec.discover.credentialsSecret: needed to list the prefix")
        with storage.credentials(env):
            uris = storage.list_uris(d.uri, limit=10 * d.max_models)
    except (BadInput, StorageUnavailable) as exc:
        metrics.reconcile_errors.labels(handler="discover").inc()
        post_event(rt, body, ("Warning", "DiscoveryFailed", f"{d.uri}: {exc}"))
        return 0
    found = pairs(d.uri, uris, d.dataset_suffix)
    if len(found) > d.max_models:
        post_event(
            rt,
            body,
            ("Warning", "TooManyModels", f"{d.uri}: {len(found)} models, maxModels {d.max_models}"),
        )
        found = found[: d.max_models]
    created = 0
    for name, model_uri, dataset_uri in found:
        made = rt.kube.create_model(model_body(pol, entry.uid, name, model_uri, dataset_uri))
        if made is not None:
            created += 1
            log.info("%s/%s: created from %s by its policy", entry.namespace, name, model_uri)
    if created:
        post_event(rt, body, ("Normal", "Discovered", f"created {created} models from {d.uri}"))
    return created
