"""Fixtures for the operator's cluster tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.fixtures import K8s
from tests.operator.support import Operator, apply_crd


@pytest.fixture(scope="session")
def crd(k8s: K8s) -> None:
    apply_crd(k8s)


@pytest.fixture
def run_operator(
    crd: None, kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., Operator]]:
    """Starts `edgeslim operator` for the test's namespace; stopped afterwards."""
    started: list[Operator] = []

    def start(**env: str) -> Operator:
        log = tmp_path / f"operator-{len(started)}.log"
        op = Operator(kubeconfig, namespace, log, env).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
