"""deployment.split on the real control plane: the compressor Job (real) splits the
artifact, the operator rolls out one Deployment + Service per part, the node agent runs
the real part servers.

The test bed has no kube-proxy or cluster DNS (tests/cluster/README.md): a pod
cannot reach a Service. So the test checks what the operator writes (part
Deployments, Services, the next part's Service URL, ownership), that part 0
stays unready while it cannot reach part 1 (the chain's readiness), then points
part 0 at part 1's pod address, which is what the Service would route to, and
checks that the model turns Ready only then and that part 0 answers with the
whole model's outputs through the real chain; last, removing the split leaves one
Deployment and Service again. Service routing itself is not exercised here.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.processes import urlopen_direct, wait_until
from tests.operator.support import (
    condition,
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    show_serving,
    wait_phase,
)

pytestmark = pytest.mark.cluster
TIMEOUT = 240
NEXT = "EDGESLIM_NEXT_PART_URL"


def _pod(k8s: K8s, namespace: str, part: int, ready: bool | None = None) -> Any:
    selector = f"edgeslim.io/model=digits,edgeslim.io/part={part}"

    def found() -> Any:
        pods = k8s.core.list_namespaced_pod(namespace, label_selector=selector).items
        pods = [p for p in pods if p.metadata.deletion_timestamp is None and p.status.pod_ip]
        ok = [
            p
            for p in pods
            if ready is None
            or any(
                c.type == "Ready" and (c.status == "True") == ready
                for c in p.status.conditions or []
            )
        ]
        return ok[0] if len(pods) == 1 and ok else None

    return wait_until(found, 90, 0.5, f"part {part}'s pod (ready={ready})")


def _http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urlopen_direct(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _env(dep: Any) -> dict[str, str]:
    return {e.name: e.value for e in dep.spec.template.spec.containers[0].env or []}


@pytest.mark.slow
def test_split_model_rolls_out_one_deployment_per_part(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits, node_agent
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()
    body = model_body("digits", s3, pipeline=[{"simplify": {}}, {"quantize": {"mode": "dynamic"}}])
    body["spec"]["deployment"] = {
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "progressDeadlineSeconds": 600,
        "split": {"parts": 2},
    }
    created = create_model(k8s, namespace, body)

    # The compressor's parts, and the operator's Deployments and Services per part.
    deploying = wait_phase(k8s, namespace, "digits", {"Deploying", "Ready"}, TIMEOUT, op)
    st = deploying["status"]
    parts = st["artifact"]["parts"]
    assert [p["uri"].rsplit("/", 2)[1:] for p in parts] == [
        ["parts", "part-0.onnx"],
        ["parts", "part-1.onnx"],
    ]
    deps = [
        wait_until(
            lambda i=i: _try(k8s.apps.read_namespaced_deployment, f"digits-part-{i}", namespace),
            60,
            0.5,
            f"part {i}",
        )
        for i in range(2)
    ]
    for i, dep in enumerate(deps):
        assert dep.metadata.owner_references[0].uid == created["metadata"]["uid"]
        assert dep.metadata.labels["edgeslim.io/part"] == str(i)
        cmd = dep.spec.template.spec.containers[0].command
        assert cmd[cmd.index("--sha256") + 1] == parts[i]["sha256"]
        svc = wait_until(
            lambda i=i: _try(k8s.core.read_namespaced_service, f"digits-part-{i}", namespace),
            30,
            0.5,
            f"part {i}'s Service",
        )
        assert svc.spec.selector["edgeslim.io/part"] == str(i)
        assert svc.metadata.owner_references[0].uid == created["metadata"]["uid"]
    assert _env(deps[0])[NEXT] == f"http://digits-part-1.{namespace}.svc:8080/v2/models/digits"
    assert NEXT not in _env(deps[1])
    assert (
        k8s.apps.list_namespaced_deployment(
            namespace, label_selector="edgeslim.io/model=digits"
        ).items.__len__()
        == 2
    ), "no single Deployment beside the parts"

    # Part 1 (the last) gets ready; part 0 cannot reach part 1's Service on this test
    # bed and stays unready, so the model is not Ready.
    p1 = _pod(k8s, namespace, 1, ready=True)
    p0 = _pod(k8s, namespace, 0)

    # Once part 0 has loaded its own part (on a busy machine that takes a while), its
    # readiness names the unreachable next part.
    def loaded() -> tuple[int, dict] | None:
        try:
            answer = _http(f"http://{p0.status.pod_ip}:8081/v2/health/ready")
        except OSError:  # not listening yet
            return None
        return answer if answer[1].get("state") != "loading" else None

    code, why = wait_until(loaded, 60, 0.5, "part 0 loaded")
    assert code == 503 and "digits-part-1" in why["reason"], why
    now = get_model(k8s, namespace, "digits")["status"]
    assert now["phase"] == "Deploying" and now["split"]["service"] == "digits-part-0"
    show_serving(k8s, namespace)

    # What the Service would route to: part 1's pod address.
    url = f"http://{p1.status.pod_ip}:8080/v2/models/digits"
    env = [
        {"name": e.name, "value": url if e.name == NEXT else e.value, "valueFrom": e.value_from}
        for e in deps[0].spec.template.spec.containers[0].env
    ]
    env = [{k: v for k, v in e.items() if v is not None} for e in env]
    k8s.apps.patch_namespaced_deployment(
        "digits-part-0",
        namespace,
        {"spec": {"template": {"spec": {"containers": [{"name": "serving", "env": env}]}}}},
    )
    ready = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
    st = ready["status"]
    assert condition(ready, "Available")["reason"] == "RolloutComplete"
    assert st["servingArtifact"] == st["artifact"]["sha256"]
    assert st["split"] == {"parts": 2, "service": "digits-part-0", "readyReplicas": [1, 1]}
    assert [p["sha256"] for p in st["lastGoodArtifact"]["parts"]] == [p["sha256"] for p in parts]

    # Part 0 answers with the whole artifact's outputs, through part 1.
    p0 = _pod(k8s, namespace, 0, ready=True)
    x = np.load(digits.val)["x"][:4].astype(np.float32)
    request = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                           "data": x.ravel().tolist()}]}  # fmt: skip
    code, answer = _http(f"http://{p0.status.pod_ip}:8080/v2/models/digits/infer", request)
    assert code == 200, answer
    key = st["artifact"]["uri"].removeprefix(f"s3://{s3}/")
    blob = s3_server.client().get_object(Bucket=s3, Key=key)["Body"].read()
    whole = ort.InferenceSession(blob)
    expected = whole.run(None, {whole.get_inputs()[0].name: x})[0]
    got = np.array(answer["outputs"][0]["data"], np.float32).reshape(expected.shape)
    assert float(np.abs(got - expected).max()) <= 1e-4
    show_serving(k8s, namespace)
    _split_removed(k8s, namespace, op)


def _try(read: Any, name: str, namespace: str) -> Any:
    try:
        return read(name, namespace)
    except Exception:
        return None


def _split_removed(k8s: K8s, namespace: str, op: Any) -> None:
    """Without the split: one Deployment and Service again, the part objects gone."""
    changed = k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io",
        "v1alpha1",
        namespace,
        "compressedmodels",
        "digits",
        {"spec": {"deployment": {"split": None}}},
    )
    generation = changed["metadata"]["generation"]
    single = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op, generation=generation)
    assert "split" not in single["status"]
    assert "parts" not in single["status"]["artifact"]

    def names() -> tuple[list[str], list[str]]:
        deps = k8s.apps.list_namespaced_deployment(namespace).items
        svcs = k8s.core.list_namespaced_service(namespace).items
        return sorted(d.metadata.name for d in deps), sorted(s.metadata.name for s in svcs)

    wait_until(lambda: names() == (["digits"], ["digits"]), 60, 0.5, "only digits left")
    show_serving(k8s, namespace)
