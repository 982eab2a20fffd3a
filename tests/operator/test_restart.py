"""An operator killed mid-flight and started again: no duplicate Job, no lost result."""

from __future__ import annotations

import time

import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent, PodOutcome
from tests.cluster.processes import wait_until
from tests.operator.support import (
    create_model,
    instant_result_hook,
    model_body,
    model_jobs,
    wait_phase,
)

pytestmark = pytest.mark.cluster


def _finished(k8s: K8s, namespace: str, name: str) -> bool:
    jobs = model_jobs(k8s, namespace, name)
    return bool(jobs) and any(
        c.type == "Complete" and c.status == "True" for c in jobs[0].status.conditions or []
    )


def test_sigkilled_operator_resumes_without_duplicates_or_lost_results(
    k8s: K8s, namespace: str, node_agent: NodeAgent, run_operator
) -> None:
    # "slow" is still running when the new operator starts (it must adopt the
    # Job); "fast" finishes while no operator runs (its result must not be lost).
    fast = instant_result_hook({namespace}, delay=1.0)
    slow = instant_result_hook({namespace}, delay=12.0)

    def hook(pod: dict) -> PodOutcome | None:
        name = (pod["metadata"].get("labels") or {}).get("edgeslim.io/model")
        return (slow if name == "slow" else fast)(pod)

    with node_agent.hooked(hook):
        op = run_operator()
        create_model(k8s, namespace, model_body("slow", "bench"))
        create_model(k8s, namespace, model_body("fast", "bench"))
        wait_until(
            lambda: model_jobs(k8s, namespace, "slow") and model_jobs(k8s, namespace, "fast"),
            30,
            0.05,
            "both Jobs",
        )
        op.kill()
        wait_until(lambda: _finished(k8s, namespace, "fast"), 30, 0.2, "fast's Job to finish")
        assert not _finished(k8s, namespace, "slow")
        time.sleep(0.5)

        op2 = run_operator()
        for name in ("slow", "fast"):
            obj = wait_phase(k8s, namespace, name, {"Ready"}, 60, op2)
            assert obj["status"]["results"]["gate"]["passed"] is True
            jobs = model_jobs(k8s, namespace, name)
            assert len(jobs) == 1, [j.metadata.name for j in jobs]
            assert obj["status"]["jobName"] == jobs[0].metadata.name
    assert "adopted existing Job slow-" in op2.log_tail(20000)
