"""`operator.rest`: the operator's API calls without the generated API classes.

Every call `Kube` makes, against a real API server: same answers (JSON, None on
404/409 where asked, Conflict, ApiException with the server's status), and the
generated modules (CoreV1Api's ~300 models) are never loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeslim.operator.kube import Conflict, Kube
from edgeslim.operator.names import API_GROUP, API_VERSION, MODEL_LABEL, PLURAL
from edgeslim.operator.rest import ROUTES
from tests.cluster.fixtures import K8s
from tests.operator.support import model_body


def test_operator_process_never_loads_the_generated_api_modules() -> None:
    code = (
        "import sys\n"
        "from kubernetes import client\n"
        "from edgeslim.operator.kube import Kube\n"
        "cfg = client.Configuration(); cfg.host = 'http://127.0.0.1:9'\n"
        "kube = Kube(client.ApiClient(cfg))\n"
        "try:\n"
        "    kube.read_job('ns', 'j')\n"
        "except Exception:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_unknown_arguments_are_refused_not_dropped() -> None:
    from kubernetes import client

    from edgeslim.operator.rest import Rest

    rest = Rest(client.ApiClient(client.Configuration()))
    with pytest.raises(TypeError, match="dry_run"):
        rest.read_namespaced_job("j", "ns", dry_run="All")
    assert "read_namespaced_job" in ROUTES


@pytest.mark.cluster
def test_every_call_against_a_real_api_server(k8s: K8s, namespace: str, crd: None) -> None:
    kube = Kube(k8s.api_client)
    # CompressedModels: get, status patch (with and without a stale resourceVersion).
    assert kube.get_model(namespace, "absent") is None
    body = model_body("m1", "bench")
    k8s.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body)
    obj = kube.get_model(namespace, "m1")
    assert obj is not None and obj["metadata"]["name"] == "m1"
    version = obj["metadata"]["resourceVersion"]
    patched = kube.patch_model_status(namespace, "m1", {"phase": "Pending"}, version)
    assert patched["status"]["phase"] == "Pending"
    with pytest.raises(Conflict):
        kube.patch_model_status(namespace, "m1", {"phase": "Queued"}, version)

    # Jobs: create (409 is None), read, pods by selector, delete (twice: gone is fine).
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j1", "namespace": namespace, "labels": {MODEL_LABEL: "m1"}},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }
    created = kube.create_job(job)
    assert created is not None and created["metadata"]["labels"][MODEL_LABEL] == "m1"
    assert kube.create_job(job) is None
    read = kube.read_job(namespace, "j1")
    assert read is not None and read["metadata"]["uid"] == created["metadata"]["uid"]
    assert kube.list_pods(namespace, f"{MODEL_LABEL}=m1") == []
    kube.delete_job(namespace, "j1")
    kube.delete_job(namespace, "j1")

    # Secrets, Events, and the exact-object deletes of serving objects.
    assert kube.read_secret(namespace, "absent") is None
    kube.post_event(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "m1.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "CompressedModel",
                "name": "m1",
                "namespace": namespace,
                "uid": obj["metadata"]["uid"],
            },
            "reason": "Test",
            "message": "posted through operator.rest",
            "type": "Normal",
            "source": {"component": "edgeslim-operator"},
        }
    )
    events = k8s.core.list_namespaced_event(namespace).items
    assert [e.message for e in events if e.reason == "Test"] == ["posted through operator.rest"]
    assert kube.read_deployment(namespace, "absent") is None
    assert kube.read_service(namespace, "absent") is None
    kube.delete_deployment(namespace, "absent", "0" * 8)
    kube.delete_service(namespace, "absent", "0" * 8)
