"""The cluster-wide Job limit against a real API server and Job controller."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import urlopen_direct, wait_until
from tests.operator.support import (
    create_model,
    instant_result_hook,
    list_models,
    model_body,
    model_jobs,
    wait_phase,
)

pytestmark = pytest.mark.cluster


def _unfinished(k8s: K8s, namespace: str) -> int:
    """Jobs holding a slot: created and not yet Complete or Failed."""
    count = 0
    for job in model_jobs(k8s, namespace):
        conds = job.status.conditions or []
        if not any(c.type in ("Complete", "Failed") and c.status == "True" for c in conds):
            count += 1
    return count


def test_never_more_than_the_limit_run_and_all_finish(
    k8s: K8s, namespace: str, node_agent: NodeAgent, run_operator, tmp_path: Path
) -> None:
    op = run_operator(EDGESLIM_MAX_CONCURRENT_JOBS="2")
    peak = 0
    queued_seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _unfinished(k8s, namespace))
            for obj in list_models(k8s, namespace):
                if (obj.get("status") or {}).get("phase") == "Queued":
                    queued_seen.add(obj["metadata"]["name"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    # Each compressor pod "runs" for 1.5 s, so Jobs overlap if the limit leaks.
    with node_agent.hooked(instant_result_hook({namespace}, delay=1.5)):
        sampler.start()
        names = [f"m{i}" for i in range(6)]
        for name in names:
            create_model(k8s, namespace, model_body(name, "bench"))
            time.sleep(1.0)  # creationTimestamp has one-second resolution: a clear order
        # Beyond the limit, objects wait in phase Queued.
        wait_phase(k8s, namespace, "m5", {"Queued", "Compressing", "Ready"}, 30, op)
        for name in names:
            obj = wait_phase(k8s, namespace, name, {"Ready"}, 90, op)
            assert obj["status"]["results"]["downloadRatio"] == 4.1
        stop.set()
        sampler.join()
    assert 1 <= peak <= 2, f"{peak} Jobs ran at once with a limit of 2"
    assert queued_seen, "no object ever waited in phase Queued"
    jobs = model_jobs(k8s, namespace)
    assert len(jobs) == 6
    # First come, first served: Jobs were created in the objects' order.
    by_model = {j.metadata.labels["edgeslim.io/model"]: j.metadata.creation_timestamp for j in jobs}
    created = [by_model[name] for name in names]
    assert created == sorted(created), created
    metrics = op.metrics()
    assert 'edgeslim_compressions_finished_total{result="passed"} 6.0' in metrics
    assert "edgeslim_compressions_started_total 6.0" in metrics
    assert 'edgeslim_models{phase="Ready"} 6.0' in metrics
    assert "edgeslim_jobs_running 0.0" in metrics and "edgeslim_jobs_queued 0.0" in metrics
    gauge = f'edgeslim_model_compression_ratio{{name="m0",namespace="{namespace}"}} 3.9'
    assert gauge in metrics
    # Per-model series go with their object.
    k8s.custom.delete_namespaced_custom_object(
        "edgeslim.io", "v1alpha1", namespace, "compressedmodels", "m0"
    )
    wait_until(lambda: gauge not in op.metrics(), 30, 0.2, "m0's gauges to go")
    with urlopen_direct(f"http://127.0.0.1:{op.port}/healthz", timeout=5) as r:
        assert r.status == 200
