"""How the operator scales with a fleet: one CompressionPolicy over N CompressedModels.

    .venv/bin/python bench/operator_scale.py --n 200
    .venv/bin/python bench/operator_scale.py --n 1000

Starts a real control plane (kube-apiserver, etcd, kube-controller-manager)
and the test node agent, applies the generated CRDs, runs `edgeslim operator`
as a subprocess (no overall Job limit) and applies one CompressionPolicy
(gate, pipeline, `maxConcurrent`) and N CompressedModels that bring only their
source, dataset and output. The node agent completes every compressor pod at
once with a valid result message instead of running the compressor: this
measures the operator, not compression. Two phases:

* **create**: the policy and N models; every model compresses (in waves of
  `maxConcurrent`) and ends Ready;
* **wave**: the policy's pipeline is edited; every model re-compresses, again
  never more than `maxConcurrent` at once, and ends Ready for the new
  generation of the policy.

For each phase it prints the time until every object is final; the lag from
each Job finishing (its completionTime) to its object being final (the
Compressed condition's lastTransitionTime; both to the second; the target:
every object within 60 s); the operator's peak RSS (VmHWM; target <= 150 MB at
1,000 objects); and API requests per object: the whole cluster's delta of
`apiserver_request_total` (Job controller and node agent included), and the
part that is the operator's (every CompressedModel and CompressionPolicy
request except the bench's own, Job creates/reads/deletes, pod lists, and the
Events the operator posted).

`--memory-debug DIR` runs the operator with EDGESLIM_MEMORY_DEBUG=DIR
(tracemalloc on: slower, and RSS includes tracemalloc's own bookkeeping) and
asks it for a dump (SIGUSR1) at the end of each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubernetes import client  # noqa: E402

from edgeslim.api.policy import POLICY_PLURAL  # noqa: E402
from edgeslim.operator.names import API_GROUP, API_VERSION, MODEL_LABEL, PLURAL  # noqa: E402
from tests.cluster.cluster import start_cluster  # noqa: E402
from tests.cluster.fixtures import K8s  # noqa: E402
from tests.operator.support import (  # noqa: E402
    Operator,
    apply_crd,
    instant_result_hook,
)

NAMESPACE = "bench"
POLICY = "fleet"
FINAL = {"Ready", "Rejected", "Failed"}
TIMEOUT_S = 1800
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
PIPELINES = (
    [{"quantize": {"mode": "dynamic"}}],
    [{"simplify": {}}, {"quantize": {"mode": "dynamic"}}],
)


def request_counts(cp: Any) -> Counter:
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


def vm_kb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parse_time(stamp: str) -> float:
    return (
        datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def policy_body(max_concurrent: int, pipeline: list) -> dict:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CompressionPolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "selector": {"matchLabels": {"fleet": "bench"}},
            "maxConcurrent": max_concurrent,
            "defaults": {
                "evaluation": {"metric": "accuracy", "maxMetricDrop": 0.05, "latencyRuns": 5},
                "pipeline": pipeline,
            },
        },
    }


def fleet_model(name: str) -> dict:
    """A model that brings only what is its own; the policy supplies the rest."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CompressedModel",
        "metadata": {"name": name, "labels": {"fleet": "bench"}},
        "spec": {
            "source": {"uri": f"s3://bench/{name}/model.onnx", "credentialsSecret": "s3-creds"},
            "evaluation": {"dataset": f"s3://bench/{name}/val.npz"},
            "output": {"uri": "s3://bench/edge/"},
        },
    }


def _condition_time(obj: dict, kind: str) -> float | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("lastTransitionTime"):
            return parse_time(c["lastTransitionTime"])
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Phase:
    """One phase's measurements: wait until all N are final for `generation`."""

    def __init__(self, name: str, bench: Bench, generation: int) -> None:
        self.name, self.bench, self.generation = name, bench, generation
        self.own: Counter = Counter()
        self.before = request_counts(bench.cp)
        self.t0 = time.monotonic()
        self.most_running = 0

    def wait(self) -> dict:
        b, n = self.bench, self.bench.n
        phases: Counter = Counter()
        while True:
            time.sleep(1.0)
            b.sample_rss()
            objs = b.list_json(b.k8s.custom.list_namespaced_custom_object, PLURAL)
            self.own[("LIST", PLURAL, "")] += 1
            jobs = b.list_json(b.k8s.batch.list_namespaced_job, "jobs")
            self.own[("LIST", "jobs", "")] += 1
            running = sum(1 for j in jobs if not j["status"].get("completionTime"))
            self.most_running = max(self.most_running, running)
            done = [o for o in objs if self.final(o)]
            phases = Counter((o.get("status") or {}).get("phase") for o in objs)
            if len(done) >= n:
                break
            if time.monotonic() - self.t0 > TIMEOUT_S:
                raise TimeoutError(f"{self.name}: not final after {TIMEOUT_S} s: {dict(phases)}")
        t_final = time.monotonic() - self.t0
        after = request_counts(b.cp)
        lags = b.lags(objs, jobs)
        sizes = sorted(len(json.dumps(o)) for o in objs)
        managed = sorted(len(json.dumps(o["metadata"].get("managedFields"))) for o in objs)
        b.dump_memory()
        return {
            "phase": self.name,
            "n": n,
            "all_final_s": t_final,
            "lag_max_s": max(lags) if lags else float("nan"),
            "lag_p95_s": percentile(lags, 0.95),
            "lags_over_60": sum(1 for x in lags if x > 60),
            "lags": len(lags),
            "most_running": self.most_running,
            "rss_mb": b.peak_rss(),
            "phases": dict(phases),
            "body_bytes": sizes[len(sizes) // 2],
            "managed_fields_bytes": managed[len(managed) // 2],
            **b.requests(self.before, after, self.own),
        }

    def final(self, o: dict) -> bool:
        st = o.get("status") or {}
        if st.get("phase") not in FINAL:
            return False
        return (st.get("policy") or {}).get("generation") == self.generation


class Bench:
    def __init__(
        self, n: int, max_concurrent: int, workers: int, memory_debug: str | None, wave: bool
    ):
        self.n, self.max_concurrent, self.workers, self.wave = n, max_concurrent, workers, wave
        self.memory_debug = memory_debug
        self.rss_samples: list[float] = []

    def list_json(self, call: Any, plural: str) -> list[dict]:
        if plural in (PLURAL, POLICY_PLURAL):
            resp = call(API_GROUP, API_VERSION, NAMESPACE, plural, _preload_content=False)
        else:
            resp = call(NAMESPACE, label_selector=MODEL_LABEL, _preload_content=False)
        return json.loads(resp.data)["items"]

    def sample_rss(self) -> None:
        self.rss_samples.append(vm_kb(self.op.proc.pid, "VmRSS"))

    def peak_rss(self) -> float:
        return vm_kb(self.op.proc.pid, "VmHWM")

    def dump_memory(self) -> None:
        if self.memory_debug:
            os.kill(self.op.proc.pid, signal.SIGUSR1)
            time.sleep(5)

    def lags(self, objs: list[dict], jobs: list[dict]) -> list[float]:
        """Seconds from each object's current Job finishing to the object being final."""
        ends = {
            j["metadata"]["name"]: parse_time(j["status"]["completionTime"])
            for j in jobs
            if j["status"].get("completionTime")
        }
        out = []
        for o in objs:
            st = o.get("status") or {}
            end, final = ends.get(st.get("jobName") or ""), _condition_time(o, "Compressed")
            if end is not None and final is not None:
                out.append(max(0.0, final - end))
        return out

    def requests(self, before: Counter, after: Counter, own: Counter) -> dict:
        delta = after - before
        for key, value in own.items():
            delta[key] -= value
        total = sum(v for v in delta.values() if v > 0)
        ours = (PLURAL, POLICY_PLURAL)
        operator_part = sum(v for (_verb, res, _sub), v in delta.items() if res in ours and v > 0)
        operator_part += sum(delta[(verb, "jobs", "")] for verb in ("POST", "GET", "DELETE"))
        operator_part += delta[("LIST", "pods", "")]
        breakdown = {
            f"{v} {r}{'/' + s if s else ''}": int(c)
            for (v, r, s), c in delta.items()
            if c > 0 and r in (*ours, "jobs", "pods", "events")
        }
        operator_part += breakdown.get("POST events", 0)  # all but a few are the operator's
        return {
            "requests_per_object": total / self.n,
            "operator_requests_per_object": operator_part / self.n,
            "breakdown": breakdown,
        }

    def _finish(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            r["idle_rss_mb"] = self.idle_rss
            r["log"] = str(self.log)
        return rows

    def run(self) -> list[dict]:
        self.cp, agent = start_cluster()
        self.op = None
        try:
            k8s = self.k8s = K8s.from_control_plane(self.cp)
            apply_crd(k8s)
            k8s.core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE))
            )
            agent.pod_hook = instant_result_hook({NAMESPACE})
            self.log = Path(tempfile.mkdtemp(prefix="edgeslim-bench-")) / "operator.log"
            env = {"EDGESLIM_MAX_CONCURRENT_JOBS": "0", "EDGESLIM_JOB_TTL_SECONDS": "3600"}
            if self.memory_debug:
                env["EDGESLIM_MEMORY_DEBUG"] = self.memory_debug
            self.op = Operator(self.cp.kubeconfig, NAMESPACE, self.log, env).start()
            self.idle_rss = vm_kb(self.op.proc.pid, "VmRSS")
            rows = []

            create = Phase("create", self, 1)
            k8s.custom.create_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                NAMESPACE,
                POLICY_PLURAL,
                policy_body(self.max_concurrent, PIPELINES[0]),
            )

            def make(i: int) -> None:
                k8s.custom.create_namespaced_custom_object(
                    API_GROUP, API_VERSION, NAMESPACE, PLURAL, fleet_model(f"m{i:05d}")
                )

            with ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(make, range(self.n)))
            create.own[("POST", PLURAL, "")] += self.n
            create.own[("POST", POLICY_PLURAL, "")] += 1
            rows.append(create.wait())
            if not self.wave:
                return self._finish(rows)

            wave = Phase("wave", self, 2)
            k8s.custom.patch_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                NAMESPACE,
                POLICY_PLURAL,
                POLICY,
                {"spec": {"defaults": {"pipeline": PIPELINES[1]}}},
                _content_type="application/merge-patch+json",
            )
            wave.own[("PATCH", POLICY_PLURAL, "")] += 1
            rows.append(wave.wait())
            return self._finish(rows)
        finally:
            if self.op is not None:
                self.op.stop()
            agent.stop()
            self.cp.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="objects (repeatable; default 100)")
    p.add_argument("--max-concurrent", type=int, default=100, help="the policy's maxConcurrent")
    p.add_argument("--workers", type=int, default=8, help="threads creating objects")
    p.add_argument("--memory-debug", help="folder for the operator's tracemalloc dumps")
    p.add_argument("--no-wave", action="store_true", help="stop after the create phase")
    args = p.parse_args(argv)
    rows = []
    for n in args.n or [100]:
        print(f"running N={n} ...", file=sys.stderr, flush=True)
        bench = Bench(n, args.max_concurrent, args.workers, args.memory_debug, not args.no_wave)
        rows += bench.run()
    print(f"maxConcurrent {args.max_concurrent}")
    header = (
        f"| {'N':>5} | {'phase':<6} | {'all final s':>11} | {'lag max s':>9} | "
        f"{'lag p95 s':>9} | {'lag > 60 s':>10} | {'most Jobs at once':>17} | "
        f"{'peak RSS MB':>11} | {'req/obj all':>11} | {'req/obj operator':>16} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['n']:>5} | {r['phase']:<6} | {r['all_final_s']:>11.1f} | "
            f"{r['lag_max_s']:>9.0f} | {r['lag_p95_s']:>9.0f} | {r['lags_over_60']:>10} | "
            f"{r['most_running']:>17} | {r['rss_mb']:>11.0f} | "
            f"{r['requests_per_object']:>11.1f} | {r['operator_requests_per_object']:>16.1f} |"
        )
    for r in rows:
        print(
            f"\nN={r['n']} {r['phase']}: phases {r['phases']}; lags measured for {r['lags']}; "
            f"idle RSS {r['idle_rss_mb']:.0f} MB; median object {r['body_bytes']} bytes of JSON "
            f"({r['managed_fields_bytes']} of them managedFields); operator log {r['log']}"
        )
        for k, v in sorted(r["breakdown"].items()):
            print(f"    {k:<40} {v:>8}  ({v / r['n']:.2f}/object)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
