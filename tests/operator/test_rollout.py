"""Edge rollout end to end: a real control plane (Deployment controller included),
the node agent running `edgeslim serve` pods as local processes, S3 (moto).

One object goes through its whole life:

1. created with `spec.deployment`: a real compressor Job, then a Deployment
   whose two replicas each bind their own pod IP and answer inference;
2. a spec change rolls out a new artifact;
3. a spec change whose artifact cannot load: its pod never becomes ready, the
   Deployment controller reports ProgressDeadlineExceeded and the operator
   rolls back to the previous artifact and does not try the bad one again;
4. deleting the object deletes Deployment and Service (ownerReferences).

Step 3 stands in a node-agent hook for the compressor, since the real one
never produces an unloadable file: the hook writes an artifact where the
compressor would (`<output>/<name>/<spec-hash>/model.onnx`) and ends the pod
with the termination message the compressor would write, so the operator
verifies and records it exactly as a real result. The artifact is garbage
bytes with their true sha256: the server's sha check passes and onnxruntime
refuses the file -- "an artifact that cannot load", which keeps the server up
and unready (503 on /v2/health/ready).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import numpy as np
import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.operator.support import (
    artifact_result_hook,
    condition,
    create_model,
    digits_in_s3,
    get_model,
    infer_digit,
    model_body,
    patch_spec,
    pod_ready,
    show_serving,
    wait_phase,
)

pytestmark = pytest.mark.cluster
TIMEOUT = 240
DEADLINE = 15  # progressDeadlineSeconds: long enough for a good pod on a busy machine
SHA_ANNOTATION = "edgeslim.io/artifact-sha256"
SERVING = "edgeslim.io/model=digits,app.kubernetes.io/component=serving"
Obj = dict[str, Any]


def serving_pods(k8s: K8s, namespace: str) -> list[Any]:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=SERVING).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def pods_on(k8s: K8s, namespace: str, sha: str, replicas: int) -> list[Any]:
    """The serving pods once exactly `replicas` ready pods run `sha` and no others."""

    def settled() -> list[Any] | None:
        pods = serving_pods(k8s, namespace)
        shas = {p.metadata.annotations.get(SHA_ANNOTATION) for p in pods}
        ok = len(pods) == replicas and shas == {sha} and all(map(pod_ready, pods))
        return pods if ok else None

    return wait_until(settled, 60, 0.5, f"{replicas} ready serving pods on {sha[:12]}")


def events(k8s: K8s, namespace: str) -> list[Any]:
    return k8s.core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=digits"
    ).items


@pytest.mark.slow
def test_rollout_new_artifact_and_rollback(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits, node_agent: NodeAgent
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()
    val = np.load(digits.val)
    samples = [(val["x"][i : i + 1], int(val["y"][i])) for i in range(5)]

    # 1. Create: compress for real, then serve two replicas.
    body = model_body("digits", s3)
    body["spec"]["deployment"] = {
        "replicas": 2,
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "progressDeadlineSeconds": DEADLINE,
        "threads": 1,
    }
    create_model(k8s, namespace, body)
    first = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
    st = first["status"]
    sha1 = st["artifact"]["sha256"]
    assert st["servingArtifact"] == sha1 and st["readyReplicas"] == 2
    assert st["lastGoodArtifact"] == {"uri": st["artifact"]["uri"], "sha256": sha1}
    assert condition(first, "Available")["status"] == "True"
    assert condition(first, "Ready")["status"] == "True"
    dep = k8s.apps.read_namespaced_deployment("digits", namespace)
    assert dep.metadata.owner_references[0].uid == first["metadata"]["uid"]
    assert dep.spec.strategy.rolling_update.max_unavailable == 0
    assert dep.spec.progress_deadline_seconds == DEADLINE
    svc = k8s.core.read_namespaced_service("digits", namespace)
    assert svc.spec.ports[0].port == 8080
    pods = pods_on(k8s, namespace, sha1, 2)
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2, "each replica binds its own pod IP"
    for ip in ips:
        right = sum(infer_digit(ip, x) == y for x, y in samples)
        assert right >= 4, f"{ip}: {right}/5 digits right"
    reasons = {e.reason for e in events(k8s, namespace)}
    assert {"GatePassed", "RolloutComplete"} <= reasons
    show_serving(k8s, namespace)

    # 2. A spec change rolls out a new artifact (compressed for real again).
    pipeline = [{"quantize": {"mode": "dynamic", "perChannel": False}}]
    generation = patch_spec(k8s, namespace, {"pipeline": pipeline})
    second = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op, generation=generation)
    sha2 = second["status"]["artifact"]["sha256"]
    assert sha2 != sha1
    assert second["status"]["servingArtifact"] == sha2
    assert second["status"]["lastGoodArtifact"]["sha256"] == sha2
    pods = pods_on(k8s, namespace, sha2, 2)
    assert all(infer_digit(p.status.pod_ip, samples[0][0]) == samples[0][1] for p in pods)

    # 3. An artifact that cannot load: rolled back to sha2, and never retried.
    garbage = b"this is not an ONNX model"
    sha3 = hashlib.sha256(garbage).hexdigest()
    with node_agent.hooked(artifact_result_hook(s3_server, garbage)):
        # A short deadline for this rollout only: its pod never gets ready, so the
        # whole deadline is waited out (the good rollouts above keep DEADLINE).
        generation = patch_spec(
            k8s,
            namespace,
            {"evaluation": {"maxMetricDrop": 0.06}, "deployment": {"progressDeadlineSeconds": 10}},
        )
        # The rollout starts: a surge pod on sha3 that stays unready.
        wait_until(
            lambda: any(
                p.metadata.annotations.get(SHA_ANNOTATION) == sha3
                for p in serving_pods(k8s, namespace)
            ),
            120,
            0.5,
            "a pod of the bad artifact",
        )
        failed = wait_phase(
            k8s, namespace, "digits", {"Failed"}, TIMEOUT, op, generation=generation
        )
    st = failed["status"]
    assert st["artifact"]["sha256"] == sha3
    assert st["servingArtifact"] == sha2
    assert st["failedArtifacts"] == [
        {"sha256": sha3, "specHash": st["specHash"], "reason": "ProgressDeadlineExceeded"}
    ]
    available = condition(failed, "Available")
    assert (available["status"], available["reason"]) == ("False", "RolledBack")
    assert condition(failed, "Ready")["reason"] == "RolledBack"
    assert condition(failed, "GatePassed")["status"] == "True"
    pods = pods_on(k8s, namespace, sha2, 2)
    assert all(infer_digit(p.status.pod_ip, samples[0][0]) == samples[0][1] for p in pods)
    warnings = {(e.type, e.reason) for e in events(k8s, namespace)}
    assert ("Warning", "ProgressDeadlineExceeded") in warnings
    assert ("Warning", "RolledBack") in warnings
    # No retry of the bad artifact: the Deployment stays on sha2.
    dep = k8s.apps.read_namespaced_deployment("digits", namespace)
    before = dep.metadata.generation
    time.sleep(5)
    dep = k8s.apps.read_namespaced_deployment("digits", namespace)
    assert dep.metadata.generation == before
    assert dep.spec.template.metadata.annotations[SHA_ANNOTATION] == sha2
    assert get_model(k8s, namespace, "digits")["status"]["phase"] == "Failed"
    # Counted once each, however many events the operator saw meanwhile.
    rollouts = re.findall(r'^edgeslim_rollouts_total\{result="(\w+)"\} (\S+)$', op.metrics(), re.M)
    assert {r: float(n) for r, n in rollouts} == {"complete": 2, "rolled_back": 1, "failed": 0}
    show_serving(k8s, namespace)

    # 4. Deleting the object deletes the serving objects (garbage collector).
    k8s.custom.delete_namespaced_custom_object(
        "edgeslim.io", "v1alpha1", namespace, "compressedmodels", "digits"
    )

    def serving_gone() -> bool:
        deps = k8s.apps.list_namespaced_deployment(namespace).items
        svcs = k8s.core.list_namespaced_service(namespace).items
        return not deps and not svcs and not serving_pods(k8s, namespace)

    wait_until(serving_gone, 60, 0.5, "Deployment, Service and pods to go")
