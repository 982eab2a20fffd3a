"""Issue 10's parallel-search goal, measured: one optimize search fanned out by the
operator on the real control plane of tests/cluster (API server, Job controller,
the node agent that runs pods as local processes) and the test S3 server, once
with the Job limit at 1 and once at 4, the wall time of each from creating the
CompressedModel to Ready.

    python bench/optimize.py --fanout          # the digits CNN, formats only
    python bench/optimize_fanout.py --limits 1 4 --train

The goal (4 workers at least 3x faster than 1) needs 4 cores for 4 candidate pods;
on a 2-core machine they share two, so the table says what this machine gives,
not what a cluster with free nodes would.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The test bed's helpers (tests/cluster, tests/operator) are imported from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster.cluster import start_cluster
from tests.cluster.fixtures import K8s, create_namespace
from tests.cluster.tools import require_binaries
from tests.operator.support import (
    Operator,
    apply_crd,
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    model_jobs,
    wait_phase,
)
from tests.s3server import S3Server

TIMEOUT_S = 1500


@dataclass
class Digits:
    """What support.digits_in_s3 reads: the files of examples/digits/build.py."""

    model_path: Path
    train: Path
    val: Path


@dataclass
class FanoutRun:
    limit: int
    seconds: float
    jobs: int
    candidates: int | None
    phase: str


def run(digits: Digits, limits: list[int], work: Path, train: bool) -> list[FanoutRun]:
    """One search per limit, each in a namespace of its own (so nothing is reused)."""
    require_binaries()
    work.mkdir(parents=True, exist_ok=True)
    cp, agent = start_cluster()
    s3 = S3Server(host="127.0.0.1").start()
    runs: list[FanoutRun] = []
    try:
        k8s = K8s.from_control_plane(cp)
        apply_crd(k8s)
        bucket = f"bench-fanout-{int(time.time())}"
        s3.create_bucket(bucket)
        for limit in limits:
            ns = f"fanout-limit-{limit}-{int(time.time()) % 100000}"
            create_namespace(k8s, ns, timeout=60, interval=0.1)
            digits_in_s3(k8s, ns, s3, bucket, digits)
            body = model_body("fanned", bucket, max_drop=0.01)
            del body["spec"]["pipeline"]
            body["spec"]["optimize"] = {"objective": "download"}
            if train:
                body["spec"]["optimize"]["trainDataset"] = f"s3://{bucket}/digits/train.npz"
            op = Operator(
                cp.kubeconfig,
                ns,
                work / f"operator-limit-{limit}.log",
                {"EDGESLIM_MAX_CONCURRENT_JOBS": str(limit)},
            ).start()
            try:
                started = time.monotonic()
                create_model(k8s, ns, body)
                obj = wait_phase(k8s, ns, "fanned", {"Ready", "Rejected", "Failed"}, TIMEOUT_S, op)
                seconds = time.monotonic() - started
                status = get_model(k8s, ns, "fanned").get("status") or {}
                runs.append(
                    FanoutRun(
                        limit,
                        seconds,
                        len(model_jobs(k8s, ns, "fanned")),
                        (status.get("results") or {}).get("candidatesTried"),
                        obj["status"]["phase"],
                    )
                )
                print(
                    f"limit {limit}: {seconds:.0f} s, {runs[-1].jobs} Jobs, phase {runs[-1].phase}",
                    flush=True,
                )
            finally:
                op.stop()
    finally:
        s3.stop()
        agent.stop()
        cp.stop()
    return runs


def table(runs: list[FanoutRun], cores: int) -> str:
    lines = [f"{'Job limit':>9} {'wall':>7} {'speedup':>8} {'Jobs':>5}  phase"]
    base = next((r.seconds for r in runs if r.limit == 1), None)
    for r in runs:
        speedup = f"{base / r.seconds:.2f}x" if base else "-"
        lines.append(f"{r.limit:>9} {r.seconds:>6.0f}s {speedup:>8} {r.jobs:>5}  {r.phase}")
    best = max((base / r.seconds for r in runs if base and r.limit == 4), default=None)
    verdict = "met" if best is not None and best >= 3 else "MISSED"
    lines.append(
        f"goal: limit 4 at least 3x faster than limit 1: {verdict} "
        f"({'-' if best is None else f'{best:.2f}x'}, on {cores} cores shared by every pod)"
    )
    return "\n".join(lines)


def main() -> None:
    import os

    import optimize as bench  # bench/optimize.py: the digits files it builds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "out" / "bench-optimize")
    parser.add_argument("--limits", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--train", action="store_true", help="with pruning probes too")
    args = parser.parse_args()
    case = bench.digits_case(args.out)
    folder = case.model.parent
    digits = Digits(folder / "cnn.onnx", folder / "train.npz", folder / "val.npz")
    runs = run(digits, args.limits, args.out / "fanout", args.train)
    print(table(runs, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
