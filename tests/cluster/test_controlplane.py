"""The control plane itself: it starts from nothing, serves, and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import K8s, binaries_or_fail
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import group_alive, pid_alive
from tests.cluster.tools import REPO_ROOT

pytestmark = pytest.mark.cluster


def test_a_second_control_plane_comes_up_and_leaves_no_process_behind(
    control_plane: ControlPlane,
) -> None:
    second = ControlPlane().start()
    try:
        assert second.api_port != control_plane.api_port
        assert second.get("/readyz") == (200, "ok")
        version = json.loads(second.get("/version")[1])
        assert version["gitVersion"] == second.binaries.versions["KUBERNETES_VERSION"]
        pids = second.pids
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert all(pid_alive(pid) for pid in pids.values())
        work_dir = second.dir
    finally:
        second.stop()
    assert not [name for name, pid in pids.items() if pid_alive(pid) or group_alive(pid)]
    assert not work_dir.exists()
    # The session's control plane is untouched.
    assert control_plane.get("/readyz") == (200, "ok")


def test_edge_node_is_registered_and_ready(k8s: K8s, node_agent: NodeAgent) -> None:
    node = k8s.core.read_node(node_agent.name)
    assert node.metadata.labels["node-role.kubernetes.io/edge"] == ""
    ready = {c.type: c.status for c in node.status.conditions}["Ready"]
    assert ready == "True"
    assert node.status.allocatable["cpu"] == "8"
    # Nothing tainted it: the node-lifecycle and taint controllers are off.
    assert not node.spec.taints


def test_rbac_is_enforced_for_a_service_account(k8s: K8s, namespace: str) -> None:
    k8s.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    token = k8s.core.create_namespaced_service_account_token(
        "nobody", namespace, client.AuthenticationV1TokenRequest(spec={"audiences": []})
    ).status.token
    config = client.Configuration()
    config.host = k8s.api_client.configuration.host
    config.ssl_ca_cert = k8s.api_client.configuration.ssl_ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(config) as api, pytest.raises(ApiException) as err:
        client.CoreV1Api(api).list_namespaced_pod(namespace)
    assert err.value.status == 403
    assert f"system:serviceaccount:{namespace}:nobody" in err.value.body


def test_build_script_is_fast_when_everything_is_cached() -> None:
    found = binaries_or_fail("kubectl", "helm")
    started = time.monotonic()
    result = subprocess.run(
        [REPO_ROOT / "scripts" / "build-controlplane.sh"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert time.monotonic() - started < 10
    for path in (*found.control_plane(), found.kubectl, found.helm):
        assert str(path) in result.stdout
    assert "building" not in result.stderr
