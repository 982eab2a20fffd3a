"""spec.targets on the real control plane: two node classes (two node agents that
register nodes with different labels), real compressor Jobs, real serving pods.

One object with two targets gets two Jobs, each bound to a node of its class,
two artifacts with their own spec hash and recipe, and two Deployments on
those nodes; status shows both, `kubectl get` counts them, and dropping a
target deletes its Deployment and Service without touching the other's, even
when its status entry has gone first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from edgeslim.api.spec import CompressedModel
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.operator.support import (
    condition,
    create_model,
    digits_in_s3,
    get_model,
    instant_result_hook,
    kubectl,
    model_body,
    model_jobs,
    pod_ready,
    wait_phase,
)

pytestmark = pytest.mark.cluster
TIMEOUT = 300  # two real compressor runs side by side on a small machine
CLASS_LABEL = "edgeslim.io/test-node-class"
TARGET_LABEL = "edgeslim.io/target"
Obj = dict[str, Any]


@pytest.fixture
def node_classes(control_plane: ControlPlane, node_agent: NodeAgent) -> Iterator[dict[str, str]]:
    """Two more nodes, `x86` and `accel` by their class label: class -> node name.
    Only pods that select a class run there (the session's node has no class label)."""
    version = control_plane.binaries.versions["KUBERNETES_VERSION"]
    agents = {
        cls: NodeAgent(
            control_plane.api_client(),
            name=f"edge-{cls}-0",
            labels={CLASS_LABEL: cls},
            kubelet_version=version,
        ).start()
        for cls in ("x86", "accel")
    }
    try:
        yield {cls: a.name for cls, a in agents.items()}
    finally:
        for a in agents.values():
            a.stop()
            with contextlib.suppress(ApiException):
                a.core.delete_node(a.name)


def s3_bytes(s3_server: Any, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def ready_pods(k8s: K8s, namespace: str, target: str) -> list[Any]:
    selector = f"edgeslim.io/model=digits,{TARGET_LABEL}={target}"
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None and pod_ready(p)]


@pytest.mark.slow
def test_two_targets_two_jobs_artifacts_and_deployments(
    k8s: K8s,
    namespace: str,
    run_operator,
    s3_server,
    s3: str,
    digits,
    node_classes: dict[str, str],
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()
    body = model_body("digits", s3, max_drop=0.05)
    body["spec"]["deployment"] = {"replicas": 1, "progressDeadlineSeconds": 120}
    body["spec"]["targets"] = [
        {"name": "x86", "nodeSelector": {CLASS_LABEL: "x86"}, "quantize": {"mode": "static"}},
        {
            "name": "accel",
            "nodeSelector": {CLASS_LABEL: "accel"},
            "tolerations": [{"key": "accelerator", "operator": "Exists"}],
            "quantize": {"mode": "fp16"},
        },
    ]
    create_model(k8s, namespace, body)

    obj = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
    st = obj["status"]
    assert st["targetsReady"] == "2/2"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Ready")["status"] == "True"
    assert condition(obj, "Reconciling")["status"] == "False"
    assert condition(obj, "Stalled")["status"] == "False"
    by_name = {t["name"]: t for t in st["targets"]}
    assert list(by_name) == ["x86", "accel"]
    assert by_name["x86"]["specHash"] != by_name["accel"]["specHash"]

    # Two Jobs, each carrying its class's placement and run on a node of that class.
    jobs = {j.metadata.labels[TARGET_LABEL]: j for j in model_jobs(k8s, namespace, "digits")}
    assert set(jobs) == {"x86", "accel"}
    for cls, job in jobs.items():
        t = by_name[cls]
        assert job.metadata.name == t["jobName"]
        assert job.spec.template.spec.node_selector == {CLASS_LABEL: cls}
        pods = k8s.core.list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/controller-uid={job.metadata.uid}"
        ).items
        assert pods and {p.spec.node_name for p in pods} == {node_classes[cls]}
    assert jobs["accel"].spec.template.spec.tolerations[0].key == "accelerator"

    # Two artifacts, each under its own spec hash, with its own recipe and verdict.
    modes = {}
    for cls, t in by_name.items():
        artifact = t["artifact"]
        prefix = f"s3://{s3}/edge/{namespace}/digits/{t['specHash']}/"
        assert artifact["uri"].startswith(prefix) and artifact["uri"].endswith("/model.onnx")
        assert (
            hashlib.sha256(s3_bytes(s3_server, artifact["uri"])).hexdigest() == artifact["sha256"]
        )
        manifest = json.loads(s3_bytes(s3_server, artifact["manifestUri"]))
        [quantize] = [s for s in manifest["steps"] if s["type"] == "quantize"]
        modes[cls] = quantize["config"]["mode"]
        assert t["results"]["gate"]["passed"] is True
        assert t["phase"] == "Ready" and t["readyReplicas"] == 1
    assert modes == {"x86": "static", "accel": "fp16"}
    assert by_name["x86"]["artifact"]["sha256"] != by_name["accel"]["artifact"]["sha256"]

    # Two Deployments (and Services) on their node pools, none of the object's own.
    for cls, t in by_name.items():
        dep = k8s.apps.read_namespaced_deployment(f"digits-{cls}", namespace)
        assert dep.spec.template.spec.node_selector == {CLASS_LABEL: cls}
        assert k8s.core.read_namespaced_service(f"digits-{cls}", namespace).spec.selector == {
            "edgeslim.io/model": "digits",
            "app.kubernetes.io/component": "serving",
            TARGET_LABEL: cls,
        }
        [pod] = wait_until(lambda c=cls: ready_pods(k8s, namespace, c), 60, 0.5, f"{cls} pod")
        assert pod.spec.node_name == node_classes[cls]
        assert pod.metadata.annotations["edgeslim.io/artifact-sha256"] == t["artifact"]["sha256"]
    names = {d.metadata.name for d in k8s.apps.list_namespaced_deployment(namespace).items}
    assert names == {"digits-x86", "digits-accel"}

    table = kubectl(k8s, namespace, "get", "compressedmodels")
    header, row = table.splitlines()[:2]
    # Columns without a value print blank: read TARGETS at its header's offset.
    assert row[header.index("TARGETS") :].split()[0] == "2/2"
    # What the README shows (visible with -s).
    per_target = (
        "{range .status.targets[*]}{.name}{'\\t'}{.phase}{'\\t'}{.specHash}{'\\t'}"
        "{.results.downloadRatio}{'\\t'}{.results.evaluation.drop}{'\\t'}"
        "{.results.latency.compressedP50Ms}{'\\t'}{.readyReplicas}{'\\n'}{end}"
    )
    print(table)
    print(kubectl(k8s, namespace, "get", "cmodel", "digits", "-o", f"jsonpath={per_target}"))
    print(kubectl(k8s, namespace, "get", "jobs,deploy", "-L", TARGET_LABEL))
    print(kubectl(k8s, namespace, "get", "pods", "-o", "wide"))

    # Dropping a target deletes its serving objects; the other keeps its artifact.
    # They are found by their labels: here another write has already dropped accel's
    # status entry (as a target's write does for targets gone from the spec).
    x86 = by_name["x86"]
    k8s.custom.patch_namespaced_custom_object_status(
        "edgeslim.io",
        "v1alpha1",
        namespace,
        "compressedmodels",
        "digits",
        {"status": {"targets": [x86]}},
    )
    patch = {"spec": {"targets": [body["spec"]["targets"][0]]}}
    changed = k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io", "v1alpha1", namespace, "compressedmodels", "digits", patch
    )
    gen = changed["metadata"]["generation"]
    obj = wait_phase(k8s, namespace, "digits", {"Ready"}, 60, op, generation=gen)
    assert obj["status"]["targetsReady"] == "1/1"
    [only] = obj["status"]["targets"]
    assert (only["name"], only["specHash"]) == ("x86", x86["specHash"])
    assert only["artifact"] == x86["artifact"]

    def accel_gone() -> bool:
        deps = {d.metadata.name for d in k8s.apps.list_namespaced_deployment(namespace).items}
        svcs = {s.metadata.name for s in k8s.core.list_namespaced_service(namespace).items}
        return "digits-accel" not in deps | svcs and "digits-x86" in deps

    wait_until(accel_gone, 30, 0.3, "digits-accel's Deployment and Service to go")
    assert {j.metadata.labels[TARGET_LABEL] for j in model_jobs(k8s, namespace, "digits")} == {
        "x86"
    }
    assert get_model(k8s, namespace, "digits")["status"]["phase"] == "Ready"


def test_targets_share_the_job_limit(
    k8s: K8s, namespace: str, node_agent: NodeAgent, run_operator
) -> None:
    """Targets go through the queue as objects do: with a limit of 1 their Jobs run
    one after the other, the waiting ones Queued in their status entry."""
    op = run_operator(EDGESLIM_MAX_CONCURRENT_JOBS="1")
    peak, queued = 0, set[str]()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            running = [
                j
                for j in model_jobs(k8s, namespace, "q")
                if not any(c.status == "True" for c in j.status.conditions or [])
            ]
            peak = max(peak, len(running))
            st = get_model(k8s, namespace, "q").get("status") or {}
            queued.update(t["name"] for t in st.get("targets") or [] if t["phase"] == "Queued")
            time.sleep(0.05)

    body = model_body("q", "bench")
    body["spec"]["targets"] = [{"name": n} for n in ("a", "b", "c")]
    sampler = threading.Thread(target=sample, daemon=True)
    # Each compressor pod "runs" for 1 s, so Jobs would overlap if the limit leaked.
    with node_agent.hooked(instant_result_hook({namespace}, delay=1.0)):
        create_model(k8s, namespace, body)
        sampler.start()
        obj = wait_phase(k8s, namespace, "q", {"Ready"}, 90, op)
        stop.set()
        sampler.join()
    assert peak == 1, f"{peak} Jobs of one object's targets ran at once with a limit of 1"
    assert queued, "no target ever waited in phase Queued"
    assert obj["status"]["targetsReady"] == "3/3"
    assert {t["phase"] for t in obj["status"]["targets"]} == {"Ready"}
    assert len({t["specHash"] for t in obj["status"]["targets"]}) == 3
    assert len(model_jobs(k8s, namespace, "q")) == 3
    assert "edgeslim_jobs_queued 0.0" in op.metrics()

    # Without targets the object is itself again: its own Job, status without entries.
    with node_agent.hooked(instant_result_hook({namespace})):
        changed = k8s.custom.patch_namespaced_custom_object(
            "edgeslim.io",
            "v1alpha1",
            namespace,
            "compressedmodels",
            "q",
            {"spec": {"targets": None}},
        )
        gen = changed["metadata"]["generation"]
        obj = wait_phase(k8s, namespace, "q", {"Ready"}, 60, op, generation=gen)
    st = obj["status"]
    assert "targets" not in st and "targetsReady" not in st
    assert st["specHash"] == CompressedModel.model_validate(changed).spec.spec_hash()
    assert st["results"]["downloadRatio"] == 4.1
    wait_until(
        lambda: [j.metadata.name for j in model_jobs(k8s, namespace, "q")] == [st["jobName"]],
        30,
        0.3,
        "the targets' Jobs to go",
    )


def test_the_api_server_refuses_two_targets_of_one_name(k8s: K8s, namespace: str, crd) -> None:
    body = model_body("dup", "bench")
    body["spec"]["targets"] = [{"name": "arm"}, {"name": "x86"}, {"name": "arm"}]
    with pytest.raises(ApiException) as caught:
        create_model(k8s, namespace, body)
    assert caught.value.status == 422
    assert "targets: names must be unique" in caught.value.body
