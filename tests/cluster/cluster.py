"""A whole test cluster: the control plane plus the edge node agent."""

from __future__ import annotations

from pathlib import Path

from tests.cluster.controlplane import ControlPlane
from tests.cluster.node_agent import NodeAgent


def start_node_agent(cp: ControlPlane) -> NodeAgent:
    """The edge node agent, running pods for ``cp``."""
    version = cp.binaries.versions["KUBERNETES_VERSION"]
    return NodeAgent(cp.api_client(), kubelet_version=version).start()


def start_cluster(work_dir: Path | None = None) -> tuple[ControlPlane, NodeAgent]:
    """A control plane with the edge node agent running against it."""
    cp = ControlPlane(work_dir=work_dir).start()
    try:
        return cp, start_node_agent(cp)
    except BaseException:
        cp.stop()
        raise
