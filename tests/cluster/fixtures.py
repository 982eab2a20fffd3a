"""pytest fixtures for tests that need a real Kubernetes control plane.

Loaded by the root conftest (``pytest_plugins = ["tests.cluster.fixtures"]``).

* ``control_plane`` (session) -- a started :class:`ControlPlane`; fails, with
  the fix, when the binaries have not been built (``make controlplane``).
* ``node_agent`` (session) -- the :class:`NodeAgent` running pods for it.
* ``kubeconfig`` (session) -- path of the admin kubeconfig (node agent running).
* ``k8s`` (session) -- a :class:`K8s` bundle of API clients for the admin user.
* ``namespace`` (function) -- a fresh namespace, deleted after the test.

Every test using them should be marked ``@pytest.mark.cluster``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster.cluster import start_node_agent
from tests.cluster.controlplane import ControlPlane
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.cluster.tools import Binaries, MissingBinariesError, require_binaries


@dataclass
class K8s:
    """The API groups tests use, sharing one connection pool."""

    api_client: client.ApiClient
    kubeconfig: Path
    core: client.CoreV1Api = field(init=False)
    batch: client.BatchV1Api = field(init=False)
    apps: client.AppsV1Api = field(init=False)
    rbac: client.RbacAuthorizationV1Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)
    apiextensions: client.ApiextensionsV1Api = field(init=False)

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.apiextensions = client.ApiextensionsV1Api(self.api_client)

    @classmethod
    def from_control_plane(cls, cp: ControlPlane) -> K8s:
        return cls(cp.api_client(), cp.kubeconfig)


def binaries_or_fail(*names: str) -> Binaries:
    """The cached binaries, or a test failure that says to run ``make controlplane``.

    Fail, not skip: a silently skipped cluster suite looks green.
    """
    try:
        return require_binaries(*names)
    except MissingBinariesError as e:
        message = str(e)
    # Outside the except block, so the report shows the message once, unchained.
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    cp = ControlPlane(binaries=binaries_or_fail()).start()
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def node_agent(control_plane: ControlPlane) -> Iterator[NodeAgent]:
    agent = start_node_agent(control_plane)
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane, node_agent: NodeAgent) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def k8s(control_plane: ControlPlane, node_agent: NodeAgent) -> K8s:
    return K8s.from_control_plane(control_plane)


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{stem}-{uuid.uuid4().hex[:6]}"


def create_namespace(k8s: K8s, name: str, timeout: float = 30, interval: float = 0.05) -> str:
    """Creates namespace `name` and waits until pods may be created in it."""
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    # The ServiceAccount admission plugin rejects pods until the controller
    # manager has created the namespace's "default" ServiceAccount.
    def has_default_sa() -> bool:
        accounts = k8s.core.list_namespaced_service_account(name).items
        return any(sa.metadata.name == "default" for sa in accounts)

    wait_until(has_default_sa, timeout, interval, f"ServiceAccount {name}/default")
    return name


@pytest.fixture
def namespace(k8s: K8s, request: pytest.FixtureRequest) -> Iterator[str]:
    name = create_namespace(k8s, _namespace_name(request.node.name))
    yield name
    # Not waited for: the namespace controller and node agent finish the
    # cleanup (pods stopped, objects removed) while the next test runs.
    k8s.core.delete_namespace(name, propagation_policy="Background")
