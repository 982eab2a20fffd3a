"""Runs `edgeslim` command lines in one long-lived process, for fuzz tests.

    python -m tests.cli_worker

Reads one JSON list of CLI arguments per line on stdin, runs
`edgeslim.cli.main` on it and answers one JSON line: the exit code, what the
command wrote to stderr (an escaped exception comes back as the traceback
Python would have printed, exit code 1) and the process's peak resident
memory so far (VmHWM). Starting Python, numpy, onnxruntime and torch once
instead of once per input is what lets a fuzz test run hundreds of inputs
through the real CLI in seconds; the test starts it with the size limits
lowered so "bounded memory" is a tight, checkable claim.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run(argv: list[str]) -> dict:
    from edgeslim.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
    return {"rc": rc, "stderr": err.getvalue(), "peak": peak_rss_bytes()}


def serve() -> None:
    # Answers go to a private copy of stdout; the CLI's own prints go nowhere.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    for line in sys.stdin:
        answers.write(json.dumps(run(json.loads(line))) + "\n")


if __name__ == "__main__":
    serve()
