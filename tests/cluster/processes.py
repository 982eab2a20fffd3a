"""Starting and stopping child processes so that none outlives its owner.

Every child gets its own session (process group), so one signal reaches it and
anything it forked; ``stop_group`` escalates SIGTERM to SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from http.client import HTTPResponse
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody is listening on right now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn(
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` in a new process group, stdout and stderr into ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signals the process group ``proc`` leads; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL it.

    The group is killed even when the leader already exited, so orphaned
    grandchildren cannot linger. Returns the leader's exit code.
    """
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    signal_group(proc, signal.SIGKILL)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_alive(pgid: int) -> bool:
    """True while any live process remains in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_until(
    predicate: Callable[[], T | None], timeout: float, interval: float = 0.1, what: str = "it"
) -> T:
    """Polls ``predicate`` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, max_bytes: int = 4000) -> str:
    """The last ``max_bytes`` of a log file, decoded leniently ('' if absent)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def urlopen_direct(
    url: str | urllib.request.Request,
    *,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> HTTPResponse:
    """``urlopen`` that never goes through an ``*_proxy`` from the environment:
    everything this harness talks to is on loopback."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    response: HTTPResponse = urllib.request.build_opener(*handlers).open(url, timeout=timeout)
    return response


def keep_dirs() -> bool:
    """``EDGESLIM_KEEP_CLUSTER_DIRS=1`` keeps control-plane and pod directories
    (component logs, pod logs) after shutdown, for debugging a failed run."""
    return os.environ.get("EDGESLIM_KEEP_CLUSTER_DIRS", "") not in ("", "0")
