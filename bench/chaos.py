"""Faults lose nothing, measured on the real control plane.

    .venv/bin/python bench/chaos.py                 # every scenario, default sizes
    .venv/bin/python bench/chaos.py --only kills --only s3

Starts a real control plane (kube-apiserver, etcd, kube-controller-manager),
the test node agent, two S3 servers (one behind a fault gate) and `edgeslim
operator` as a subprocess per scenario, each scenario in its own namespace:

* kills: the operator SIGKILLed at >= 20 random points (and restarted at once)
  while >= 100 reconciles happen: creates, Job completions, rollouts, spec
  changes, rollouts again, deletions (half with the cleanup finalizer);
* s3: the S3 server goes down in the middle of each of the compressor's four
  uploads (model staging, model publish, manifest staging, manifest publish)
  of a real `edgeslim compress`, and comes back 6 s later; a reader polls the
  bucket all along;
* apiserver: kube-apiserver restarted twice (SIGTERM, then SIGKILL) while Jobs
  run and finish and after a spec change; the operator must not restart;
* corrupt: one byte of a new artifact flipped in storage after the gate passed;
  real `edgeslim serve` pods serve the previous artifact.

Prints a Markdown table (duplicate Jobs, lost results, partial artifacts,
final objects: the goal is 0, 0, 0, 100%) and each scenario's notes. The
scenarios themselves live in tests/operator/chaos.py, shared with
tests/operator/test_chaos.py, which runs them small.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from tests.cluster.cluster import start_cluster  # noqa: E402
from tests.cluster.fixtures import K8s, create_namespace  # noqa: E402
from tests.operator import chaos  # noqa: E402
from tests.operator.support import Operator, apply_crd  # noqa: E402
from tests.s3server import S3Server  # noqa: E402

SCENARIOS = ("kills", "s3", "apiserver", "corrupt")
# The operator, compressor and server all run this checkout's code (also when it
# is a copy: `git archive HEAD | tar -x -C /tmp/x` measures a commit, frozen).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
POD_COMMAND = f"env PYTHONPATH={ROOT} {sys.executable} -m edgeslim.cli"
POD_COMMANDS = {"EDGESLIM_COMPRESSOR_COMMAND": POD_COMMAND, "EDGESLIM_SERVING_COMMAND": POD_COMMAND}
DIGITS = ROOT / "out" / "chaos" / "digits"


def digits() -> Path:
    """The example digits model and validation split (built once, ~1 min; the test
    suite's cached copy when there is one)."""
    cached = sorted((ROOT / ".pytest_cache" / "d").glob("digits-*-15/val.npz"))
    if cached:
        return cached[-1].parent
    if not (DIGITS / "val.npz").exists():
        print("building the digits example model ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "examples/digits/build.py"), "--out", str(DIGITS),
             "--epochs", "15"],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    return DIGITS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=SCENARIOS, help="repeatable")
    p.add_argument("--objects", type=int, default=16, help="objects per kill round")
    p.add_argument("--kills", type=int, default=20, help="minimum operator SIGKILLs")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    chosen = args.only or list(SCENARIOS)
    logs = Path(tempfile.mkdtemp(prefix="edgeslim-chaos-"))
    cp, agent = start_cluster()
    plain, faulty = S3Server().start(), S3Server(faults=True).start()
    operators: list[Operator] = []
    rows: list[chaos.Row] = []
    try:
        k8s = K8s.from_control_plane(cp)
        apply_crd(k8s)

        def bed(scenario: str, s3: S3Server) -> chaos.Bed:
            ns = create_namespace(k8s, f"chaos-{scenario}", timeout=60, interval=0.1)

            def start_operator(**env: str) -> Operator:
                log = logs / f"{ns}-operator-{len(operators)}.log"
                op = Operator(cp.kubeconfig, ns, log, {**POD_COMMANDS, **env})
                operators.append(op)
                return op.start()

            return chaos.Bed(k8s, ns, agent, s3, f"chaos-{scenario}", start_operator, cp).prepare()

        runs: dict[str, Callable[[], chaos.Row]] = {
            "kills": lambda: chaos.operator_kills(
                bed("kills", plain), objects=args.objects, min_kills=args.kills, seed=args.seed
            ),
            "s3": lambda: _s3(bed("s3", faulty)),
            "apiserver": lambda: chaos.apiserver_restarts(bed("apiserver", plain), seed=args.seed),
            "corrupt": lambda: chaos.corrupt_artifact(bed("corrupt", plain)),
        }
        for name in chosen:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            rows.append(runs[name]())
            print(f"  {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        for op in operators:
            op.stop()
        faulty.stop()
        plain.stop()
        agent.stop()
        cp.stop()
    print(chaos.table(rows))
    for r in rows:
        print(f"\n{r.scenario}:")
        for note in r.notes:
            print(f"  - {note}")
    print(f"\noperator logs: {logs}")
    return 0 if all(r.ok for r in rows) else 1


def _s3(bed: chaos.Bed) -> chaos.Row:
    data = digits()
    bed.upload([(data / "cnn.onnx", "digits/cnn.onnx"), (data / "val.npz", "digits/val.npz")])
    return chaos.s3_outage(bed)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
