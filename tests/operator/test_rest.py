"""`operator.rest`: the operator's API calls without the kubernetes client.

Every call `Kube` makes, against a real API server: same answers (JSON, None on
404/409 where asked, Conflict, ApiError with the server's status), and the
operator's process never loads the `kubernetes` package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeslim.operator import credentials
from edgeslim.operator.kube import Conflict, Kube, api_message
from edgeslim.operator.names import API_GROUP, API_VERSION, MODEL_LABEL, PLURAL
from edgeslim.operator.rest import ROUTES, ApiError, Rest
from tests.cluster.fixtures import K8s
from tests.operator.support import model_body

# `edgeslim operator`, reporting on its way out which packages it had loaded.
_ENTRY = """
import atexit, sys
def loaded():
    print(sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}))
atexit.register(loaded)
from edgeslim.cli import main
sys.exit(main(["operator"]))
"""


def test_the_operator_entry_point_never_imports_kubernetes(tmp_path: Path) -> None:
    """`edgeslim operator` imports kopf, the handlers and our login, then stops
    at the credential check (none here): `kubernetes` was never loaded (kopf
    imports it whenever it is installed, as it is in this venv)."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    run = subprocess.run(
        [sys.executable, "-c", _ENTRY], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "no Kubernetes credentials" in run.stderr
    loaded = set(ast.literal_eval(run.stdout.strip().splitlines()[-1]))
    assert {"kopf", "edgeslim", "urllib3"} <= loaded
    assert not loaded & {"kubernetes", "requests", "oauthlib", "google"}


def test_unknown_arguments_are_refused_not_dropped() -> None:
    rest = Rest(credentials.Credentials(server="http://127.0.0.1:9"))
    with pytest.raises(TypeError, match="dry_run"):
        rest.read_namespaced_job("j", "ns", dry_run="All")
    assert "read_namespaced_job" in ROUTES


@pytest.mark.cluster
def test_every_call_against_a_real_api_server(k8s: K8s, namespace: str, crd: None) -> None:
    kube = Kube.connect(kubeconfig=k8s.kubeconfig)
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

    # Any other non-2xx: ApiError, with the server's status and its Status message.
    bad = {**job, "metadata": {"name": "Not_A_Name", "namespace": namespace}}
    with pytest.raises(ApiError) as caught:
        kube.create_job(bad)
    assert caught.value.status == 422 and "Not_A_Name" in api_message(caught.value)
