"""``make cluster`` (python -m tests.cluster): everything up, then Ctrl-C stops it all."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from kubernetes import client, config

from tests.cluster.fixtures import binaries_or_fail
from tests.cluster.processes import pid_alive
from tests.cluster.tools import REPO_ROOT

pytestmark = pytest.mark.cluster


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (control-plane children start new sessions,
    so the process tree, not the process group, is what links them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _drain(proc: subprocess.Popen[str], into: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        into.put(line)


def _take_all(lines: queue.Queue[str]) -> list[str]:
    taken = []
    while not lines.empty():
        taken.append(lines.get_nowait())
    return taken


def test_make_cluster_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    binaries_or_fail()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # A thread drains the output: reading it in the test would block on EOF,
    # which a straggling descendant holding the pipe could delay past the exit
    # this test is about.
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_drain, args=(proc, lines), daemon=True)
    reader.start()
    try:
        output = ""
        deadline = time.monotonic() + 120
        while "AWS_DEFAULT_REGION" not in output and time.monotonic() < deadline:
            try:
                output += lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None:
                    break
        kubeconfig = re.search(r"^export KUBECONFIG=(\S+)$", output, re.M)
        endpoint = re.search(r"^export AWS_ENDPOINT_URL=(\S+)$", output, re.M)
        assert kubeconfig and endpoint, output

        api = config.new_client_from_config(config_file=kubeconfig.group(1))
        nodes = client.CoreV1Api(api).list_node().items
        assert [n.metadata.name for n in nodes] == ["edge-node-0"]
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint.group(1),
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="models")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["models"]

        children = descendants(proc.pid)
        assert len(children) >= 3  # etcd, kube-apiserver, kube-controller-manager
        proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        # A hang detector, not a timing: the clean-up takes seconds.
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            alive = sorted(pid for pid in children if pid_alive(pid))
            pytest.fail(
                f"no exit 120s after Ctrl-C; still alive: {alive}; "
                f"output since: {''.join(_take_all(lines))}"
            )
        took = time.monotonic() - stopping
        reader.join(timeout=10)
        rest = "".join(_take_all(lines))
        left = sorted(pid for pid in children if pid_alive(pid))
        assert proc.returncode == 0, rest
        assert rest.strip().endswith("stopped"), f"after {took:.0f}s: {rest}"
        assert not left, f"still alive {took:.0f}s after Ctrl-C: {left}"
    finally:
        if proc.poll() is None:
            # SIGTERM runs the same clean-up as Ctrl-C; SIGKILL would orphan
            # the control plane.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
