"""``make cluster``: a control plane, the edge node agent and an S3 server in
the foreground, for trying the operator by hand. Ctrl-C (or SIGTERM) stops
everything and leaves no process behind.

    .venv/bin/python -m tests.cluster
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType

from tests.cluster.cluster import start_cluster
from tests.cluster.controlplane import ControlPlane
from tests.cluster.node_agent import NodeAgent
from tests.cluster.tools import MissingBinariesError, binaries, require_binaries
from tests.s3server import S3Server


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same clean-up path as Ctrl-C.
    raise KeyboardInterrupt


def _describe(cp: ControlPlane, agent: NodeAgent, s3: S3Server | None) -> str:
    kubectl = binaries().kubectl
    lines = [
        "",
        "edgeslim test cluster is up (Ctrl-C to stop)",
        f"  API server:  {cp.server}",
        f"  kubeconfig:  {cp.kubeconfig}",
        f"  edge node:   {agent.name} (pods run as local processes; logs under {agent.dir})",
    ]
    if kubectl.exists():
        lines.append(f"  kubectl:     {kubectl}")
    lines += ["", f"export KUBECONFIG={cp.kubeconfig}"]
    if s3 is not None:
        lines += [f"export {name}={value}" for name, value in s3.env().items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("--no-s3", action="store_true", help="do not start the S3 server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        require_binaries()
    except MissingBinariesError as e:
        print(e, file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _interrupt)
    # A shell without job control starts background commands with SIGINT ignored,
    # and every child inherits that (make test run with `&`, then pytest, then this
    # process): Ctrl-C would do nothing. Whoever sends SIGINT here means it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cp: ControlPlane | None = None
    agent: NodeAgent | None = None
    s3: S3Server | None = None
    try:
        started = time.monotonic()
        cp, agent = start_cluster()
        if not args.no_s3:
            s3 = S3Server(host="127.0.0.1").start()
        print(f"started in {time.monotonic() - started:.1f}s", flush=True)
        print(_describe(cp, agent, s3), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if s3 is not None:
            s3.stop()
        if agent is not None:
            agent.stop()
        if cp is not None:
            cp.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
