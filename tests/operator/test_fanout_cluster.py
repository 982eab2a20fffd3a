"""An optimize search fanned out by the operator on a real API server, Job
controller and S3 endpoint, with real compressor pods: the plan, each candidate
and the pick run as separate Jobs, never more at once than the Job limit, and
a search whose operator is killed halfway resumes without redoing a candidate."""

from __future__ import annotations

import json
import threading
import time

import pytest
from kubernetes import client

from edgeslim.api.spec import CompressedModel
from tests.cluster.fixtures import K8s
from tests.cluster.processes import wait_until
from tests.operator.support import (
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    model_jobs,
    wait_phase,
)
from tests.results import expected_prefix

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TIMEOUT = 300
LIMIT = 2
PLANNED = 4


def _finished(job: client.V1Job) -> bool:
    conds = job.status.conditions or []
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in conds)


def test_candidates_run_as_separate_jobs_within_the_limit_and_resume(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    bucket = s3_server.client()
    body = model_body("fanned", s3, max_drop=0.01)
    del body["spec"]["pipeline"]
    body["spec"]["optimize"] = {"objective": "download", "maxCandidates": PLANNED}
    spec_hash = CompressedModel.model_validate(body).spec.spec_hash()
    # <spec-hash>/<inputs-id>/: the folder of this content of the inputs
    prefix = expected_prefix(body, f"s3://{s3}/edge/", namespace).removeprefix(f"s3://{s3}/")
    assert prefix.startswith(f"edge/{namespace}/fanned/{spec_hash}/")

    peak, progress = 0, set()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sum(not _finished(j) for j in model_jobs(k8s, namespace)))
            progress.add(
                (get_model(k8s, namespace, "fanned").get("status") or {}).get("candidates")
            )
            time.sleep(0.05)

    op = run_operator(EDGESLIM_MAX_CONCURRENT_JOBS=str(LIMIT))
    create_model(k8s, namespace, body)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # Kill the operator once a candidate is stored and before the last one is.
        def first_candidate_stored() -> bool:
            found = bucket.list_objects_v2(Bucket=s3, Prefix=f"{prefix}candidates/")
            return any(o["Key"].endswith("manifest.json") for o in found.get("Contents", []))

        wait_until(first_candidate_stored, TIMEOUT, 0.2, "a stored candidate")
        op.kill()
        stored = {
            o["Key"]: o["ETag"]
            for o in bucket.list_objects_v2(Bucket=s3, Prefix=f"{prefix}candidates/")["Contents"]
            if o["Key"].endswith("manifest.json")
        }
        assert 1 <= len(stored) < PLANNED, stored
        op2 = run_operator(EDGESLIM_MAX_CONCURRENT_JOBS=str(LIMIT))
        ready = wait_phase(k8s, namespace, "fanned", {"Ready"}, TIMEOUT, op2)
    finally:
        stop.set()
        sampler.join(timeout=10)

    jobs = model_jobs(k8s, namespace, "fanned")
    steps = sorted(
        (j.metadata.labels.get("edgeslim.io/step", "result"), j.metadata.name) for j in jobs
    )
    short = f"fanned-{spec_hash[:10]}"
    assert steps == [
        *(("candidate", f"{short}-c{i}") for i in range(PLANNED)),
        ("plan", f"{short}-plan"),
        ("result", short),
    ]
    assert all(j.status.succeeded == 1 for j in jobs)
    assert peak <= LIMIT, peak
    assert ready["status"]["candidates"] == f"{PLANNED}/{PLANNED}"
    assert f"0/{PLANNED}" in progress or f"1/{PLANNED}" in progress
    results = ready["status"]["results"]
    assert results["candidatesTried"] == PLANNED and results["downloadRatio"] > 3
    # The candidates stored before the kill were not computed again.
    after = {
        o["Key"]: o["ETag"]
        for o in bucket.list_objects_v2(Bucket=s3, Prefix=f"{prefix}candidates/")["Contents"]
        if o["Key"].endswith("manifest.json")
    }
    assert len(after) == PLANNED
    assert all(after[k] == etag for k, etag in stored.items())
    # Each candidate was measured by its own Job: the pick took every one as stored.
    manifest = json.loads(bucket.get_object(Bucket=s3, Key=f"{prefix}manifest.json")["Body"].read())
    for i, cand in enumerate(manifest["candidates"]):
        key = f"{prefix}candidates/{i}/manifest.json"
        record = json.loads(bucket.get_object(Bucket=s3, Key=key)["Body"].read())
        assert cand["seconds"] == record["figures"]["seconds"], i


def test_a_spec_change_or_deletion_stops_the_search(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    body = model_body("changed", s3, max_drop=0.01)
    del body["spec"]["pipeline"]
    body["spec"]["optimize"] = {"objective": "download", "maxCandidates": PLANNED}
    old = CompressedModel.model_validate(body).spec.spec_hash()
    op = run_operator(EDGESLIM_MAX_CONCURRENT_JOBS="1")
    create_model(k8s, namespace, body)
    wait_until(
        lambda: any(
            j.metadata.name == f"changed-{old[:10]}-c0" for j in model_jobs(k8s, namespace)
        ),
        TIMEOUT,
        0.2,
        "the first candidate Job",
    )
    patched = k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io",
        "v1alpha1",
        namespace,
        "compressedmodels",
        "changed",
        {"spec": {"optimize": {"maxCandidates": 2}}},
    )
    new = CompressedModel.model_validate(patched).spec.spec_hash()
    ready = wait_phase(
        k8s, namespace, "changed", {"Ready"}, TIMEOUT, op, patched["metadata"]["generation"]
    )
    assert ready["status"]["specHash"] == new and ready["status"]["candidates"] == "2/2"
    # The old search's Jobs are gone; nothing of it ran on after the change.
    wait_until(
        lambda: all(
            j.metadata.labels["edgeslim.io/spec-hash"] == new
            for j in model_jobs(k8s, namespace, "changed")
        ),
        60,
        0.2,
        "the old search's Jobs to be deleted",
    )
    names = sorted(j.metadata.name for j in model_jobs(k8s, namespace, "changed"))
    short = f"changed-{new[:10]}"
    assert names == [short, f"{short}-c0", f"{short}-c1", f"{short}-plan"]

    # Deleting the object mid-search takes the search's Jobs with it.
    third = k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io",
        "v1alpha1",
        namespace,
        "compressedmodels",
        "changed",
        {"spec": {"optimize": {"maxCandidates": 3}}},
    )
    plan = f"changed-{CompressedModel.model_validate(third).spec.spec_hash()[:10]}-plan"
    wait_until(
        lambda: any(j.metadata.name == plan for j in model_jobs(k8s, namespace, "changed")),
        TIMEOUT,
        0.2,
        "the third search's plan Job",
    )
    k8s.custom.delete_namespaced_custom_object(
        "edgeslim.io", "v1alpha1", namespace, "compressedmodels", "changed"
    )
    wait_until(lambda: not model_jobs(k8s, namespace, "changed"), 60, 0.5, "the Jobs to go")
