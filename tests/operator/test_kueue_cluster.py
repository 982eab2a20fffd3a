"""An optimize search fanned out under a real Kueue on the real control plane,
with real compressor pods and S3: every step is a Job of its own that waits,
suspended, in a LocalQueue, the ClusterQueue's quota (room for two candidate
pods) -- not the operator's Job limit -- decides how many run, and a killed
operator's successor finishes the search. Kueue replaces only that overall
limit: a CompressionPolicy's maxConcurrent still rolls its models one wave at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from edgeslim.api.policy import POLICY_PLURAL
from edgeslim.api.spec import CompressedModel
from edgeslim.operator import kueue as operator_kueue
from edgeslim.operator.names import API_GROUP, API_VERSION, KUEUE_QUEUE_LABEL, STEP_LABEL
from tests.cluster import kueue
from tests.cluster.fixtures import K8s
from tests.cluster.processes import wait_until
from tests.cluster.tools import binaries
from tests.operator.support import (
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    model_jobs,
    wait_phase,
)

KUEUE = binaries().kueue
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(
        not KUEUE.exists(), reason=f"Kueue is not built ({KUEUE} is missing): make controlplane"
    ),
]
TIMEOUT = 300
PLANNED = 3
QUOTA_PODS = 2  # cpu quota / the CPU each candidate pod requests (kueue.DEFAULT_CPU = 1)
LOCAL_QUEUE = "edge"


@pytest.fixture(scope="module")
def real_kueue(k8s: K8s, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started = kueue.Kueue(KUEUE, kubeconfig, tmp_path_factory.mktemp("kueue")).start(k8s.api_client)
    yield started
    started.stop()


def _finished(job: client.V1Job) -> bool:
    conds = job.status.conditions or []
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in conds)


def test_candidates_run_as_separate_jobs_as_kueue_admits_them(
    k8s: K8s, namespace: str, real_kueue: kueue.Kueue, run_operator, s3_server, s3: str, digits
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    cluster_queue = f"cq-{namespace}"
    quota = str(QUOTA_PODS * int(operator_kueue.DEFAULT_CPU))
    kueue.queues(k8s.api_client, namespace, cluster_queue, LOCAL_QUEUE, cpu=quota)
    body = model_body("queued", s3, max_drop=0.01)
    del body["spec"]["pipeline"]
    body["spec"]["optimize"] = {"objective": "download", "maxCandidates": PLANNED}
    spec_hash = CompressedModel.model_validate(body).spec.spec_hash()

    peak, seen_suspended = 0, set()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            jobs = k8s.batch.list_namespaced_job(namespace).items
            running = [j for j in jobs if not j.spec.suspend and not _finished(j)]
            peak = max(peak, len(running))
            seen_suspended.update(j.metadata.name for j in jobs if j.spec.suspend)
            time.sleep(0.05)

    # The operator's own limit (1) would run the candidates one by one: under
    # Kueue it does not apply, so two run at once, as the quota allows.
    op = run_operator(EDGESLIM_KUEUE_QUEUE=LOCAL_QUEUE, EDGESLIM_MAX_CONCURRENT_JOBS="1")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        create_model(k8s, namespace, body)
        # Killed once a candidate ended: Kueue goes on admitting the candidates
        # already queued, and a new operator picks the search up where it is.
        wait_until(
            lambda: any(
                _finished(j) and j.metadata.labels.get(STEP_LABEL) == "candidate"
                for j in k8s.batch.list_namespaced_job(namespace).items
            ),
            TIMEOUT,
            0.2,
            "a candidate Job to end",
        )
        op.kill()
        op2 = run_operator(EDGESLIM_KUEUE_QUEUE=LOCAL_QUEUE, EDGESLIM_MAX_CONCURRENT_JOBS="1")
        done = wait_phase(k8s, namespace, "queued", {"Ready", "Rejected"}, TIMEOUT, op2)
    finally:
        stop.set()
        sampler.join(timeout=10)

    jobs = k8s.batch.list_namespaced_job(namespace).items
    short = f"queued-{spec_hash[:10]}"
    steps = sorted((j.metadata.labels.get(STEP_LABEL, "result"), j.metadata.name) for j in jobs)
    assert steps == [
        *(("candidate", f"{short}-c{i}") for i in range(PLANNED)),
        ("plan", f"{short}-plan"),
        ("result", short),
    ]
    for job in jobs:
        assert job.metadata.labels[KUEUE_QUEUE_LABEL] == LOCAL_QUEUE
        requests = job.spec.template.spec.containers[0].resources.requests
        assert requests == {"cpu": operator_kueue.DEFAULT_CPU}
        assert job.status.succeeded == 1
    # Candidates beyond the quota waited, suspended, for a running one to end;
    # Kueue never let more run than its quota, and did run two at once.
    waited = {f"{short}-c{i}" for i in range(PLANNED)} & seen_suspended
    assert len(waited) >= PLANNED - QUOTA_PODS, seen_suspended
    assert peak == QUOTA_PODS, peak
    # Each Job went through Kueue: a Workload admitted by the ClusterQueue.
    assert _admitted_workloads(k8s, namespace, cluster_queue) == {j.metadata.name for j in jobs}
    # The pick took every candidate: the search is recorded like without Kueue.
    assert done["status"]["candidates"] == f"{PLANNED}/{PLANNED}"
    assert done["status"]["results"]["candidatesTried"] == PLANNED
    assert get_model(k8s, namespace, "queued")["status"]["jobName"] == short


def _admitted_workloads(k8s: K8s, namespace: str, cluster_queue: str) -> set[str]:
    """Names of the Jobs whose Workload the ClusterQueue admitted."""
    workloads = k8s.custom.list_namespaced_custom_object(
        kueue.GROUP, kueue.VERSION, namespace, "workloads"
    )["items"]
    return {
        w["metadata"]["ownerReferences"][0]["name"]
        for w in workloads
        if (w.get("status") or {}).get("admission", {}).get("clusterQueue") == cluster_queue
    }


def test_a_policy_rolls_one_model_at_a_time_though_kueue_has_room_for_both(
    k8s: K8s, namespace: str, real_kueue: kueue.Kueue, run_operator, s3_server, s3: str, digits
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    cluster_queue = f"cq-{namespace}"
    room = str(2 * int(operator_kueue.DEFAULT_CPU))  # both models' Jobs at once
    kueue.queues(k8s.api_client, namespace, cluster_queue, LOCAL_QUEUE, cpu=room)
    policy = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CompressionPolicy",
        "metadata": {"name": "team-a"},
        "spec": {
            "selector": {"matchLabels": {"team": "a"}},
            "defaults": {"pipeline": [{"simplify": {}}]},  # the cheapest real compression
            "maxConcurrent": 1,
        },
    }
    k8s.custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, policy
    )
    held = "waiting for one of CompressionPolicy team-a's 1 slots"
    peak, held_while_first_ran = 0, False
    stop = threading.Event()

    def sample(first_job: str) -> None:
        nonlocal peak, held_while_first_ran
        while not stop.is_set():
            unfinished = {j.metadata.name for j in model_jobs(k8s, namespace) if not _finished(j)}
            peak = max(peak, len(unfinished))
            st = get_model(k8s, namespace, "second").get("status") or {}
            if st.get("phase") == "Queued" and held in (st.get("message") or ""):
                held_while_first_ran |= unfinished == {first_job}
            time.sleep(0.1)

    def labelled(name: str) -> dict:
        body = model_body(name, s3)
        body["metadata"]["labels"] = {"team": "a"}
        del body["spec"]["pipeline"]  # the policy's
        return body

    op = run_operator(EDGESLIM_KUEUE_QUEUE=LOCAL_QUEUE)
    create_model(k8s, namespace, labelled("first"))
    # Its Job exists: the policy's one slot is taken before the second model comes.
    [job] = wait_until(lambda: model_jobs(k8s, namespace, "first"), TIMEOUT, 0.1, "a Job")
    create_model(k8s, namespace, labelled("second"))
    sampler = threading.Thread(target=sample, args=(job.metadata.name,), daemon=True)
    sampler.start()
    try:
        done = [wait_phase(k8s, namespace, n, {"Ready"}, TIMEOUT, op) for n in ("first", "second")]
    finally:
        stop.set()
        sampler.join(timeout=10)

    # Kueue had room for both; the policy let one Job exist at a time, and the
    # second model said why it waited while the first's Job ran.
    assert peak == 1, peak
    assert held_while_first_ran
    jobs = {j.metadata.name: j for j in model_jobs(k8s, namespace)}
    assert set(jobs) == {d["status"]["jobName"] for d in done}
    assert all(j.metadata.labels[KUEUE_QUEUE_LABEL] == LOCAL_QUEUE for j in jobs.values())
    assert _admitted_workloads(k8s, namespace, cluster_queue) == set(jobs)
