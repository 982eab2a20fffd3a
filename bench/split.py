"""A split model served as a chain of servers against the whole model in one server.

    .venv/bin/python bench/split.py [--requests 200] [--archs resnet18,bert]

For each model (torchvision's resnet18 on 32x32 inputs and the small BERT of
bench/archs.py, untrained: latency and memory do not depend on the weights'
values), `edgeslim split` cuts it into 2 and 3 parts; every configuration runs
as real `edgeslim serve` processes on 127.0.0.1 with one onnxruntime thread,
the parts chained with --next-part-url. A client sends one-sample Open
Inference Protocol v2 requests to the whole model's server or to part 0, one
at a time over a kept-alive connection, and checks every answer against
onnxruntime in process. Reported: p50 / p95 latency, the chain's overhead
against the whole model, and each server's peak RSS (VmHWM) after the run.

Loopback only: a real chain adds the network's round trip per part. On a
shared 2-core machine the servers and the client compete for the cores, so
read the numbers against each other, all taken in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeslim.compressor import split as sp  # noqa: E402

NAME = "m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def servers(paths: list[Path], tmp: Path) -> Iterator[list[tuple[int, subprocess.Popen]]]:
    """One `edgeslim serve` per model file, started from the last, chained in order."""
    started: list[tuple[int, subprocess.Popen]] = []
    try:
        for path in reversed(paths):
            port = free_port()
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if started:
                env["EDGESLIM_NEXT_PART_URL"] = f"http://127.0.0.1:{started[0][0]}"
            log = open(tmp / f"serve-{port}.log", "wb")  # noqa: SIM115 - closed with the process
            cmd = [sys.executable, "-m", "edgeslim.cli", "serve", "--model", str(path)]
            cmd += ["--name", NAME, "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            started.insert(0, (port, proc))
            wait_ready(port, proc)
        yield started
    finally:
        for _, proc in started:
            proc.terminate()
        for _, proc in started:
            proc.wait(30)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"server on {port} not ready in {timeout} s")


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def body(feed: dict[str, np.ndarray]) -> bytes:
    kinds = {"f": "FP32", "i": "INT64"}
    tensors = [
        {
            "name": n,
            "shape": list(a.shape),
            "datatype": kinds[a.dtype.kind],
            "data": a.ravel().tolist(),
        }
        for n, a in feed.items()
    ]
    return json.dumps({"inputs": tensors}).encode()


def ask(conn: http.client.HTTPConnection, payload: bytes, expected: np.ndarray) -> float:
    start = time.perf_counter()
    conn.request(
        "POST",
        f"/v2/models/{NAME}/infer",
        body=payload,
        headers={"content-type": "application/json"},
    )
    resp = conn.getresponse()
    data = resp.read()
    took = time.perf_counter() - start
    if resp.status != 200:
        raise SystemExit(f"request failed: {resp.status} {data[:300]!r}")
    answer = json.loads(data)["outputs"][0]
    got = np.asarray(answer["data"], np.float32).reshape(answer["shape"])
    if not np.allclose(got, expected, atol=1e-4):
        raise SystemExit(f"answer differs from onnxruntime by {np.abs(got - expected).max()}")
    return took


def interleaved(
    ports: list[int], payload: bytes, expected: np.ndarray, n: int
) -> list[list[float]]:
    """n timed requests to each port, taken in turns so that the shared machine's
    load falls on every configuration alike (after 10 untimed warm-up rounds)."""
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=60) for p in ports]
    out: list[list[float]] = [[] for _ in ports]
    for i in range(n + 10):
        for conn, times in zip(conns, out, strict=True):
            took = ask(conn, payload, expected)
            if i >= 10:
                times.append(took)
    return out


def build(arch: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    import archs  # bench/archs.py: the script's folder is first on sys.path

    module, task = archs.build(arch)
    model = archs.export(module, task)
    feed = {k: v[:1] for k, v in task.val.items()}
    return model, feed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--archs", default="resnet18,bert")
    parser.add_argument("--parts", default="2,3")
    args = parser.parse_args()
    rows = []
    for arch in args.archs.split(","):
        model, feed = build(arch)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = sess.run(None, feed)[0]
        payload = body(feed)
        with tempfile.TemporaryDirectory(prefix="edgeslim-bench-split-") as tmp:
            tmp_path = Path(tmp)
            whole = tmp_path / "whole.onnx"
            onnx.save(model, str(whole))
            configs: list[tuple[str, list[Path], str]] = [("whole", [whole], "")]
            for parts in (int(p) for p in args.parts.split(",")):
                result = sp.split(model, parts)
                out = tmp_path / f"split{parts}"
                out.mkdir()
                for part, record in zip(result.parts, result.plan.parts, strict=True):
                    (out / record.file).write_bytes(part.SerializeToString())
                cut = "+".join(str(c.bytes) for c in result.plan.cuts)
                configs.append((f"{parts} parts", [out / p.file for p in result.plan.parts], cut))
            with contextlib.ExitStack() as stack:
                chains = [stack.enter_context(servers(paths, tmp_path)) for _, paths, _ in configs]
                times = interleaved([c[0][0] for c in chains], payload, expected, args.requests)
                rss = [[peak_rss(p.pid) for _, p in c] for c in chains]
            base_p50 = statistics.median(times[0]) * 1e3
            for (label, _, cut), lat, mem in zip(configs, times, rss, strict=True):
                p50 = statistics.median(lat) * 1e3
                p95 = float(np.percentile(lat, 95)) * 1e3
                rows.append(
                    (
                        arch,
                        label,
                        cut or "-",
                        f"{p50:.2f}",
                        f"{p95:.2f}",
                        "-" if label == "whole" else f"{p50 - base_p50:+.2f}",
                        " / ".join(f"{r / 2**20:.0f}" for r in mem),
                        f"{max(mem) / rss[0][0]:.2f}x",
                    )
                )
    head = (
        "model",
        "setup",
        "cut bytes/sample",
        "p50 ms",
        "p95 ms",
        "p50 overhead ms",
        "peak RSS per server MiB",
        "largest server vs whole",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
