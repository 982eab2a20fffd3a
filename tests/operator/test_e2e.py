"""End to end: CRD, operator, real compressor Jobs run by the node agent, S3 (moto).

One object of each kind runs side by side to keep the suite short: a passing
spec (then changed), a rejecting spec and a spec whose dataset does not exist.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster.fixtures import K8s
from tests.cluster.processes import wait_until
from tests.operator.support import (
    condition,
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    model_jobs,
    wait_phase,
)

pytestmark = pytest.mark.cluster
CLEANUP = {"edgeslim.io/cleanup-artifacts": "true"}
TIMEOUT = 240  # a real compressor run, three at a time on a small machine


def _s3_sha(s3_server, uri: str) -> str:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def _keys(s3_server, bucket: str, prefix: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


@pytest.mark.slow
def test_compress_change_reject_fail_and_delete(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits, tmp_path: Path
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()

    create_model(k8s, namespace, model_body("digits", s3, annotations=CLEANUP))
    # Structured pruning of 90% of channels without distillation wrecks accuracy.
    wrecked = [{"prune": {"method": "structured", "sparsity": 0.9}}]
    create_model(k8s, namespace, model_body("wrecked", s3, pipeline=wrecked, max_drop=0.0))
    create_model(k8s, namespace, model_body("missing", s3, dataset="nope.npz"))

    # Seen at once: Ready is Unknown while the compressor runs.
    first = wait_phase(k8s, namespace, "digits", {"Compressing", "Ready"}, 30, op)
    assert condition(first, "Ready")["status"] in ("Unknown", "True")

    ready = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
    st = ready["status"]
    assert st["observedGeneration"] == ready["metadata"]["generation"]
    assert condition(ready, "GatePassed")["status"] == "True"
    assert condition(ready, "Compressed")["status"] == "True"
    assert condition(ready, "Ready")["status"] == "True"
    assert st["results"]["gate"]["passed"] is True
    assert st["results"]["downloadRatio"] > 1 and "drop" in st["results"]["evaluation"]
    artifact = st["artifact"]
    # <spec-hash>/<inputs-id>/: a folder per content of the inputs
    spec_dir = f"s3://{s3}/edge/{namespace}/digits/{st['specHash']}/"
    assert artifact["uri"].startswith(spec_dir) and artifact["uri"].endswith("/model.onnx")
    assert artifact["uri"].count("/") == spec_dir.count("/") + 1
    assert _s3_sha(s3_server, artifact["uri"]) == artifact["sha256"]
    assert artifact["manifestUri"].endswith("/manifest.json")
    [job] = model_jobs(k8s, namespace, "digits")
    assert job.metadata.owner_references[0].uid == ready["metadata"]["uid"]
    events = k8s.core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=digits"
    ).items
    assert {"Compressing", "GatePassed"} <= {e.reason for e in events}

    # A spec change supersedes the result: a new Job and a new artifact.
    patch = {"spec": {"evaluation": {"maxMetricDrop": 0.06}}}
    changed = k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io", "v1alpha1", namespace, "compressedmodels", "digits", patch
    )
    generation = changed["metadata"]["generation"]
    again = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op, generation=generation)
    assert again["status"]["specHash"] != st["specHash"]
    assert again["status"]["artifact"]["uri"] != artifact["uri"]
    assert (
        _s3_sha(s3_server, again["status"]["artifact"]["uri"])
        == again["status"]["artifact"]["sha256"]
    )
    job_names = {j.metadata.name for j in model_jobs(k8s, namespace, "digits")}
    assert again["status"]["jobName"] in job_names

    rejected = wait_phase(k8s, namespace, "wrecked", {"Rejected"}, TIMEOUT, op)
    assert condition(rejected, "GatePassed")["status"] == "False"
    assert condition(rejected, "Ready")["status"] == "False"
    assert rejected["status"]["results"]["evaluation"]["drop"] > 0
    assert rejected["status"]["artifact"]["uri"].endswith("/model.rejected.onnx")

    failed = wait_phase(k8s, namespace, "missing", {"Failed"}, TIMEOUT, op)
    assert condition(failed, "Ready")["reason"] == "InvalidSpec"
    assert "nope.npz" in failed["status"]["message"]
    [bad_job] = model_jobs(k8s, namespace, "missing")
    pods = k8s.core.list_namespaced_pod(
        namespace, label_selector=f"job-name={bad_job.metadata.name}"
    ).items
    assert len(pods) == 1, "bad input must not be retried"

    # Deleting the object takes its Jobs (garbage collector) and, being
    # annotated, its artifacts.
    assert _keys(s3_server, s3, f"edge/{namespace}/digits/")
    k8s.custom.delete_namespaced_custom_object(
        "edgeslim.io", "v1alpha1", namespace, "compressedmodels", "digits"
    )
    wait_until(lambda: not model_jobs(k8s, namespace, "digits"), 60, 0.5, "digits' Jobs to go")
    wait_until(
        lambda: not _keys(s3_server, s3, f"edge/{namespace}/digits/"), 30, 0.5, "artifacts to go"
    )
    assert _keys(s3_server, s3, f"edge/{namespace}/wrecked/"), (
        "only the annotated object's artifacts go"
    )

    def gone() -> bool:
        try:
            get_model(k8s, namespace, "digits")
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, 30, 0.5, "the object to go")


def test_a_spec_pydantic_refuses_fails_at_once_without_a_job(
    k8s: K8s, namespace: str, run_operator
) -> None:
    op = run_operator()
    # The API server takes DNS-subdomain names; the models want a DNS label
    # (the name goes into Job names and labels).
    create_model(k8s, namespace, model_body("dotted.name", "bench"))
    failed = wait_phase(k8s, namespace, "dotted.name", {"Failed"}, 30, op)
    assert condition(failed, "Ready")["reason"] == "InvalidSpec"
    assert "metadata.name" in failed["status"]["message"]
    assert failed["status"]["observedGeneration"] == failed["metadata"]["generation"]
    assert model_jobs(k8s, namespace) == []
