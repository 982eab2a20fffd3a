"""Edge server throughput and latency, beside its floors and MLServer.

    .venv/bin/python bench/serving.py [--seconds 2] [--no-mlserver]

Builds the digits CNN (examples/digits/build.py) into a temp dir, quantizes it
to int8 (static QDQ), and for fp32 and int8 measures requests/s and p50/p99
latency at concurrency 1, 8 and 32 of one-sample Open Inference Protocol v2
requests against, in the same run:

* ``edgeslim serve``                      - the server under test;
* in-process onnxruntime                  - compute floor (no HTTP, no JSON);
* in-process + v2 JSON codec              - what edgeslim does per request, minus HTTP;
* HTTP echo, raw asyncio / uvicorn        - transport floors: the same payload
                                            echoed on loopback, no model;
* MLServer (PyPI) with bench/mlserver_onnx - the reference server, in its own
                                            venv at out/bench/mlserver-venv
                                            (created on first use).

The load generator is an asyncio client on raw sockets with keep-alive, one
connection per concurrent client, bounded by time and request count, loopback
only. Every server runs with one onnxruntime thread. On a shared 2-core
machine client and server compete for the cores, so treat numbers as
relative: they are all taken in the same run, under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MLSERVER_VENV = ROOT / "out" / "bench" / "mlserver-venv"
CONCURRENCY = (1, 8, 32)
MAX_REQUESTS = 50_000


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0

    def cells(self) -> list[str]:
        err = f" ({self.errors} errors)" if self.errors else ""
        return [f"{self.rps:,.0f}{err}", f"{self.p50_ms:.3f}", f"{self.p99_ms:.3f}"]


def summarize(latencies: list[float], seconds: float, errors: int = 0) -> Result:
    lat = sorted(latencies)
    if not lat:
        return Result(0.0, float("nan"), float("nan"), errors)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return Result(len(lat) / seconds, statistics.median(lat) * 1e3, p99 * 1e3, errors)


# ----------------------------------------------------------------- load generator


async def _client(
    port: int,
    request: bytes,
    stop_at: float,
    warm_until: float,
    out: list[float],
    budget: list[int],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while budget[0] > 0:
            now = time.perf_counter()
            if now >= stop_at:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if head[9:12] != b"200":
                errors[0] += 1
            elif now >= warm_until:
                out.append(done - now)
                budget[0] -= 1
    finally:
        writer.close()


@dataclass
class Samples:
    """Latencies gathered over one or more measuring rounds of one cell."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0

    def result(self) -> Result:
        return summarize(self.latencies, self.seconds, self.errors)


async def _load(port: int, request: bytes, concurrency: int, seconds: float, into: Samples) -> None:
    start = time.perf_counter()
    warm_until = start + min(0.2, seconds / 3)  # connections open, caches warm
    stop_at = warm_until + seconds
    latencies: list[float] = []
    budget, errors = [MAX_REQUESTS], [0]
    await asyncio.gather(
        *(
            _client(port, request, stop_at, warm_until, latencies, budget, errors)
            for _ in range(concurrency)
        )
    )
    into.latencies += latencies
    into.seconds += min(time.perf_counter(), stop_at) - warm_until
    into.errors += errors[0]


def load(
    port: int, path: str, body: bytes, concurrency: int, seconds: float, into: Samples
) -> None:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    _run(_load(port, request, concurrency, seconds, into))


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# ----------------------------------------------------------------- echo servers


class _RawEcho(asyncio.Protocol):
    """HTTP/1.1 keep-alive echo in ~20 lines: the floor for Python on this loop."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def _echo_asgi(scope: dict, receive, send) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _ort_echo_app(model: Path):
    """Echo plus one onnxruntime run on a fixed sample: HTTP + compute, no protocol at all.

    The floor for any server on this stack: a run between requests costs more
    than in a hot loop (cold caches after the idle gap), and this row shows it.
    """
    from edgeslim.serving.model import LoadedModel

    loaded = LoadedModel("digits", model, "0" * 64, threads=1)
    feed = {"input": np.zeros((1, 1, 8, 8), np.float32)}

    async def app(scope: dict, receive, send) -> None:
        loaded.session.run(None, feed)
        await _echo_asgi(scope, receive, send)

    return app


def _starlette_app(model: Path):
    """edgeslim's own request handling behind starlette's router and Request/Response."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from edgeslim.serving.app import ServingApp
    from edgeslim.serving.model import LoadedModel

    loaded = LoadedModel("digits", model, "0" * 64, threads=1)
    ours = ServingApp("digits", lambda: loaded)

    async def infer(request: Request) -> Response:
        body = ours._handle(loaded, await request.body())
        return Response(body, media_type="application/json")

    async def up(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(
        routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"]), Route("/", up)]
    )


def echo_main(kind: str, port: int, model: Path | None) -> None:
    if kind == "raw":

        async def main() -> None:
            server = await asyncio.get_running_loop().create_server(_RawEcho, "127.0.0.1", port)
            await server.serve_forever()

        _run(main())
        return
    import uvicorn

    app = {
        "uvicorn": lambda: _echo_asgi,
        "ort-echo": lambda: _ort_echo_app(model),
        "starlette": lambda: _starlette_app(model),
    }[kind]()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


# -------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(
    cmd: list[str], ready_url: str, timeout: float = 60.0, **kwargs: object
) -> Iterator[subprocess.Popen]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"{Path(cmd[0]).name} exited with {proc.returncode}: "
                    + _errors(log.read().decode(errors="replace"))
                )
            try:
                with urllib.request.urlopen(ready_url, timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after {timeout:.0f} s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _errors(text: str) -> str:
    """The distinct error lines of a log (a traceback's last lines), or its tail."""
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("raise ") or line in found:
            continue
        if "Error" in line or "error" in line.split(":", 1)[0]:
            found.append(line)
    return "; ".join(found[-3:]) if found else text[-300:]


# ----------------------------------------------------------------------- models


def build_models(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """fp32 and int8 digits models plus one validation sample, built from scratch."""
    data = tmp / "data"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "digits" / "build.py"),
            "--out",
            str(data),
            "--epochs",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    import onnx

    from edgeslim.api.spec import QuantizeConfig
    from edgeslim.compressor import datasets
    from edgeslim.compressor.quantize import Quantize
    from edgeslim.compressor.steps import StepContext

    fp32 = data / "cnn.onnx"
    ctx = StepContext(
        source=onnx.load(fp32),
        workdir=tmp,
        load_dataset=lambda uri, sha, model: datasets.load(Path(uri), model, uri),
        load_model=None,  # type: ignore[arg-type]
        evaluation_dataset=str(data / "val.npz"),
        train_datasets=[str(data / "train.npz")],
    )
    int8 = tmp / "int8.onnx"
    # Static QDQ int8: what edgeslim's pipelines produce (dynamic int8 is the
    # slow-on-CPUs-without-VNNI trap the compression bench shows).
    quantized = Quantize(QuantizeConfig(mode="static", calibration_samples=128))
    onnx.save(quantized.run(onnx.load(fp32), ctx).model, int8)
    sample = np.load(data / "val.npz")["x"][:1]
    return fp32, int8, sample


def request_body(sample: np.ndarray) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(sample.shape),
                    "datatype": "FP32",
                    "data": sample.ravel().tolist(),
                }
            ]
        }
    ).encode()


def in_process(
    path: Path, sample: np.ndarray, body: bytes, seconds: float
) -> tuple[Result, Result]:
    """(onnxruntime alone, decode + validate + run + encode as the server does)."""
    from edgeslim.serving import protocol
    from edgeslim.serving.model import LoadedModel

    model = LoadedModel("bench", path, "0" * 64, threads=1)
    feed = {"input": sample}

    def timed(fn) -> Result:
        lat: list[float] = []
        end = time.perf_counter() + seconds / 2
        while time.perf_counter() < end and len(lat) < MAX_REQUESTS:
            t = time.perf_counter()
            fn()
            lat.append(time.perf_counter() - t)
        return summarize(lat, sum(lat))

    def codec() -> None:
        req = protocol.parse_infer_request(body)
        outs = model.run(model.feed(req), model.output_names(req.outputs))
        protocol.encode_infer_response(model.name, model.version, req.id, outs)

    return timed(lambda: model.session.run(None, feed)), timed(codec)


# --------------------------------------------------------------------- MLServer


def ensure_mlserver() -> Path:
    """MLServer's own venv (its pins clash with ours); installed from PyPI on first use."""
    python = MLSERVER_VENV / "bin" / "python"
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if not mlserver.exists():
        print("installing MLServer into", MLSERVER_VENV, "(first run only)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "mlserver", "onnxruntime"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return mlserver


def mlserver_repo(tmp: Path, models: dict[str, Path], port: int, workers: int) -> Path:
    repo = tmp / "mlserver"
    repo.mkdir()
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                "host": "127.0.0.1",
                "debug": False,
                "parallel_workers": workers,
                "load_models_at_startup": True,
            }
        )
    )
    for name, path in models.items():
        (repo / name).mkdir()
        (repo / name / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "runtime.OnnxRuntime",
                    "parameters": {"uri": str(path), "extra": {"threads": 1}},
                }
            )
        )
    return repo


# ------------------------------------------------------------------------- main


def table(rows: list[tuple[str, str, dict[int, Result] | str]]) -> str:
    head = ["server", "model"] + [
        f"c={c} {k}" for c in CONCURRENCY for k in ("req/s", "p50 ms", "p99 ms")
    ]
    lines = [head]
    for server, model, results in rows:
        if isinstance(results, str):
            lines.append([server, model, results] + [""] * (len(head) - 3))
            continue
        cells = []
        for c in CONCURRENCY:
            cells += results[c].cells() if c in results else ["-", "-", "-"]
        lines.append([server, model, *cells])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = []
    for n, row in enumerate(lines):
        out.append(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


@dataclass
class Target:
    server: str
    model: str
    port: int
    path: str
    samples: dict[int, Samples] = field(default_factory=lambda: {c: Samples() for c in CONCURRENCY})


def measure(targets: list[Target], body: bytes, seconds: float, rounds: int) -> None:
    """Short rounds, taking every target in turn: the load others put on a shared
    machine drifts over a run, and interleaving spreads it evenly over the rows."""
    for c in CONCURRENCY:
        for _ in range(rounds):
            for t in targets:
                load(t.port, t.path, body, c, seconds / rounds, t.samples[c])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measured time per cell")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="split each cell into this many rounds, interleaved across servers",
    )
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument(
        "--mlserver-workers",
        type=int,
        default=0,
        help="MLServer parallel_workers (0: inference in the server process, "
        "its fastest for a small model; 1 is its default)",
    )
    parser.add_argument(
        "--echo", choices=["raw", "uvicorn", "ort-echo", "starlette"], help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        echo_main(args.echo, args.port, args.model)
        return 0

    began = time.monotonic()
    rows: list[tuple[str, str, dict[int, Result] | str]] = []
    with (
        tempfile.TemporaryDirectory(prefix="edgeslim-bench-") as tmpdir,
        contextlib.ExitStack() as running,
    ):
        tmp = Path(tmpdir)
        print("building the digits models...", flush=True)
        fp32, int8, sample = build_models(tmp)
        body = request_body(sample)
        models = {"fp32": fp32, "int8": int8}
        secs = args.seconds

        for label, path in models.items():
            raw, codec = in_process(path, sample, body, secs)
            rows.append(("in-process onnxruntime", label, {1: raw}))
            rows.append(("in-process + v2 JSON codec", label, {1: codec}))

        print("starting servers...", flush=True)
        targets: list[Target] = []
        infer = "/v2/models/digits/infer"

        def start(
            server: str, model: str, cmd: list[str], ready: str, path: str = infer, **kwargs: object
        ) -> None:
            port = free_port()
            cmd = [part.replace("{port}", str(port)) for part in cmd]
            running.enter_context(process(cmd, f"http://127.0.0.1:{port}{ready}", **kwargs))
            targets.append(Target(server, model, port, path))

        bench = [sys.executable, __file__, "--port", "{port}"]
        start("HTTP echo (raw)", "-", [*bench, "--echo", "raw"], "/")
        start("HTTP echo (uvicorn)", "-", [*bench, "--echo", "uvicorn"], "/")
        for kind, title in (
            ("ort-echo", "uvicorn echo + ort.run (no protocol)"),
            ("starlette", "starlette + edgeslim handler"),
        ):
            for label, path in models.items():
                start(title, label, [*bench, "--echo", kind, "--model", str(path)], "/", cwd=ROOT)
        for label, path in models.items():
            start(
                "edgeslim serve",
                label,
                [
                    sys.executable,
                    "-m",
                    "edgeslim.cli",
                    "serve",
                    "--model",
                    str(path),
                    "--name",
                    "digits",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                    "--threads",
                    "1",
                    "--log-level",
                    "warning",
                ],
                "/v2/health/ready",
                cwd=ROOT,
            )

        if args.no_mlserver:
            rows.append(("MLServer", "-", "skipped (--no-mlserver)"))
        else:
            try:
                mlserver = ensure_mlserver()
                port = free_port()
                repo = mlserver_repo(tmp, models, port, args.mlserver_workers)
                env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "mlserver_onnx")}
                running.enter_context(
                    process(
                        [str(mlserver), "start", str(repo)],
                        f"http://127.0.0.1:{port}/v2/models/int8/ready",
                        timeout=120,
                        env=env,
                        cwd=repo,
                    )
                )
                for label in models:
                    targets.append(
                        Target(
                            f"MLServer (workers={args.mlserver_workers})",
                            label,
                            port,
                            f"/v2/models/{label}/infer",
                        )
                    )
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                reason = " ".join(str(exc).split())[:300]
                rows.append(("MLServer", "-", f"unavailable ({reason})"))

        print(f"measuring {len(targets)} servers x {len(CONCURRENCY)} concurrencies...", flush=True)
        measure(targets, body, secs, args.rounds)
        rows += [
            (t.server, t.model, {c: s.result() for c, s in t.samples.items()}) for t in targets
        ]

    print()
    print(table(rows))
    print()
    print(verdict(rows))
    print(
        f"\n(one-sample requests, {secs:g} s per cell, {os.cpu_count()} CPUs, "
        f"total {time.monotonic() - began:.0f} s)"
    )
    return 0


def verdict(rows: list[tuple[str, str, dict[int, Result] | str]]) -> str:
    """The two aims, computed from this run's own numbers."""
    found = {(s, m): r for s, m, r in rows if not isinstance(r, str)}
    echo = found[("HTTP echo (uvicorn)", "-")][1].p50_ms
    raw_echo = found[("HTTP echo (raw)", "-")][1].p50_ms
    lines = []
    for model in ("fp32", "int8"):
        ours = found[("edgeslim serve", model)]
        floor = found[("in-process onnxruntime", model)][1].p50_ms
        minimal = found[("uvicorn echo + ort.run (no protocol)", model)][1].p50_ms
        lines.append(
            f"{model}: p50 at c=1 is {ours[1].p50_ms / (echo + floor):.2f}x (uvicorn echo + "
            f"in-process), {ours[1].p50_ms / (raw_echo + floor):.2f}x (raw echo + in-process), "
            f"{ours[1].p50_ms / minimal:.2f}x (uvicorn echo + ort.run in one app)"
        )
        star = found[("starlette + edgeslim handler", model)]
        ratios = ", ".join(f"c={c} {ours[c].rps / star[c].rps:.2f}x" for c in CONCURRENCY)
        lines.append(f"{model}: req/s raw ASGI vs starlette with the same handler: {ratios}")
        ml = next(
            (r for (s, m), r in found.items() if s.startswith("MLServer") and m == model), None
        )
        if ml is not None:
            ratios = ", ".join(f"c={c} {ours[c].rps / ml[c].rps:.1f}x" for c in CONCURRENCY)
            lines.append(f"{model}: req/s vs MLServer: {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
