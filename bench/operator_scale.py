"""How the operator scales with the number of CompressedModels.

    .venv/bin/python bench/operator_scale.py --n 100
    .venv/bin/python bench/operator_scale.py --n 1000

Starts a real control plane (kube-apiserver, etcd, kube-controller-manager)
and the test node agent, applies the generated CRD, runs `edgeslim operator`
as a subprocess (no concurrency limit) and applies N CompressedModels. The
node agent completes every compressor pod at once with a valid result message
instead of running the compressor: this measures the operator, not
compression. Prints:

* time until every object has its Job, and until every status is final;
* how long after the last Job finished the last status became final (the
  target: < 2 min for 1,000 objects);
* the operator's peak RSS (VmHWM; target < 250 MB);
* API requests per object: the whole cluster's delta of
  `apiserver_request_total` (Job controller and node agent included), and the
  part that is the operator's: every CompressedModel request except the
  bench's own creates and polls, Job creates/reads, pod lists, and the Events
  the operator posted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubernetes import client  # noqa: E402

from edgeslim.operator.names import API_GROUP, API_VERSION, MODEL_LABEL, PLURAL  # noqa: E402
from tests.cluster.cluster import start_cluster  # noqa: E402
from tests.cluster.fixtures import K8s  # noqa: E402
from tests.operator.support import (  # noqa: E402
    Operator,
    apply_crd,
    instant_result_hook,
    model_body,
)

NAMESPACE = "bench"
FINAL = {"Ready", "Rejected", "Failed"}
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def request_counts(cp) -> Counter:
    """apiserver_request_total by (verb, resource, subresource)."""
    status, text = cp.get("/metrics", timeout=30)
    assert status == 200, status
    counts: Counter = Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        counts[key] += float(m["value"])
    return counts


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parse_time(stamp: str) -> float:
    return (
        datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def run(n: int, workers: int) -> dict:
    cp, agent = start_cluster()
    op = None
    try:
        k8s = K8s.from_control_plane(cp)
        apply_crd(k8s)
        k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        agent.pod_hook = instant_result_hook({NAMESPACE})
        log = Path(tempfile.mkdtemp(prefix="edgeslim-bench-")) / "operator.log"
        op = Operator(
            cp.kubeconfig,
            NAMESPACE,
            log,
            {"EDGESLIM_MAX_CONCURRENT_JOBS": "0", "EDGESLIM_JOB_TTL_SECONDS": "3600"},
        )
        op.start()
        own_requests: Counter = Counter()
        before = request_counts(cp)

        t0 = time.monotonic()
        wall0 = time.time()

        def create(i: int) -> None:
            k8s.custom.create_namespaced_custom_object(
                API_GROUP, API_VERSION, NAMESPACE, PLURAL, model_body(f"m{i:05d}", "bench")
            )

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(create, range(n)))
        own_requests[("POST", PLURAL, "")] += n
        t_created = time.monotonic() - t0

        t_jobs = t_final = None
        phases: Counter = Counter()
        while t_final is None:
            time.sleep(1.0)
            if t_jobs is None:
                jobs = k8s.batch.list_namespaced_job(
                    NAMESPACE, label_selector=MODEL_LABEL, _preload_content=False
                )
                own_requests[("LIST", "jobs", "")] += 1
                if len(__import__("json").loads(jobs.data)["items"]) >= n:
                    t_jobs = time.monotonic() - t0
            objs = k8s.custom.list_namespaced_custom_object(
                API_GROUP, API_VERSION, NAMESPACE, PLURAL
            )["items"]
            own_requests[("LIST", PLURAL, "")] += 1
            phases = Counter((o.get("status") or {}).get("phase") for o in objs)
            if sum(phases[p] for p in FINAL) >= n:
                t_final = time.monotonic() - t0
            if time.monotonic() - t0 > 1800:
                raise TimeoutError(f"not final after 30 min: {dict(phases)}")
        wall_final = time.time()
        after = request_counts(cp)
        rss = vm_hwm_mb(op.proc.pid)

        import json

        jobs = json.loads(k8s.batch.list_namespaced_job(NAMESPACE, _preload_content=False).data)
        ends = [j["status"].get("completionTime") for j in jobs["items"]]
        last_job_end = max(parse_time(e) for e in ends if e)
        first_job_end = min(parse_time(e) for e in ends if e)
        events = json.loads(k8s.core.list_namespaced_event(NAMESPACE, _preload_content=False).data)
        op_events = sum(
            1
            for e in events["items"]
            if (e.get("source") or {}).get("component") == "edgeslim-operator"
        )

        delta = after - before
        for key, value in own_requests.items():
            delta[key] -= value
        total = sum(v for v in delta.values() if v > 0)
        operator_part = sum(v for (verb, res, _sub), v in delta.items() if res == PLURAL and v > 0)
        operator_part += sum(delta[(verb, "jobs", "")] for verb in ("POST", "GET", "DELETE"))
        operator_part += delta[("LIST", "pods", "")]
        operator_part += op_events
        breakdown = {
            f"{v} {r}{'/' + s if s else ''}": int(c)
            for (v, r, s), c in delta.items()
            if c > 0 and r in (PLURAL, "jobs", "pods", "events")
        }
        return {
            "n": n,
            "created_s": t_created,
            "all_jobs_s": t_jobs,
            "all_final_s": t_final,
            "jobs_finished_span_s": last_job_end - first_job_end,
            "final_after_last_job_s": wall_final - last_job_end,
            "wall0": wall0,
            "rss_mb": rss,
            "requests_per_object": total / n,
            "operator_requests_per_object": operator_part / n,
            "operator_events": op_events,
            "phases": dict(phases),
            "breakdown": breakdown,
            "log": str(log),
        }
    finally:
        if op is not None:
            op.stop()
        agent.stop()
        cp.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="objects (repeatable; default 100)")
    p.add_argument("--workers", type=int, default=8, help="threads creating objects")
    args = p.parse_args(argv)
    rows = []
    for n in args.n or [100]:
        print(f"running N={n} ...", file=sys.stderr, flush=True)
        rows.append(run(n, args.workers))
    header = (
        f"{'N':>6} {'create s':>9} {'all Jobs s':>11} {'all final s':>12} "
        f"{'final-lastJob s':>16} {'peak RSS MB':>12} {'req/obj all':>12} "
        f"{'req/obj operator':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['n']:>6} {r['created_s']:>9.1f} {r['all_jobs_s']:>11.1f} "
            f"{r['all_final_s']:>12.1f} {r['final_after_last_job_s']:>16.1f} "
            f"{r['rss_mb']:>12.0f} {r['requests_per_object']:>12.1f} "
            f"{r['operator_requests_per_object']:>17.1f}"
        )
    for r in rows:
        print(
            f"\nN={r['n']}: phases {r['phases']}; Jobs finished over "
            f"{r['jobs_finished_span_s']:.0f} s; operator Events {r['operator_events']}; "
            f"operator log {r['log']}"
        )
        for k, v in sorted(r["breakdown"].items()):
            print(f"    {k:<40} {v:>8}  ({v / r['n']:.2f}/object)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
