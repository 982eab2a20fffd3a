"""The edge server under hostile clients: a real `edgeslim serve` child on 127.0.0.1,
held to 256 open files, flooded with stalled bodies, idle and slow connections and
more connections than it may hold, while the kubelet's probes keep asking.

The model is a two-input graph built here with onnx.helper (no torch), so the
server is ready in a second and its memory is the server's, not the model's.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import onnx
import pytest
from onnx import TensorProto, helper

from edgeslim.cli import main
from edgeslim.errors import BadInput
from edgeslim.serving.limits import (
    FD_HEADROOM,
    HEALTH_MAX_CONNECTIONS,
    ServingLimits,
    fit_to_open_files,
)
from tests.test_serving import free_port, metric_samples, wait_for

NAME = "tiny"
INFER = f"/v2/models/{NAME}/infer"
MiB = 1024 * 1024

FD_LIMIT = 256
BODY = 16 * MiB  # the default --max-body-bytes: each stalled body declares the most allowed
BUDGET = 64 * MiB  # the default --max-inflight-body-bytes: four such bodies at once
TIMEOUT = 3.0  # --body-timeout, --header-timeout and --keep-alive-timeout for the flood
# What the flood may add to the idle server's RSS: the in-flight body budget, plus
# allocator slack for the bodies' chunks and the buffers of a few hundred sockets.
# Before the limits the same flood added 660 MB and kept it.
RSS_ALLOWANCE = BUDGET + 48 * MiB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = relu(x) for FP32 x [batch, 4]; k passes INT32 [batch] through."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    k = helper.make_tensor_value_info("k", TensorProto.INT32, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    kk = helper.make_tensor_value_info("kk", TensorProto.INT32, ["batch"])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["k"], ["kk"])],
        "tiny",
        [x, k],
        [y, kk],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, path)
    return path


@dataclass
class Server:
    url: str
    port: int
    health: str
    proc: subprocess.Popen
    log: Path


def _fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def serve(model: Path, tmp: Path, *args: str) -> Iterator[Server]:
    port, health_port = free_port(), free_port()
    log = tmp / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeslim.cli",
                "serve",
                "--model",
                str(model),
                "--name",
                NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--health-port",
                str(health_port),
                "--threads",
                "1",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_fd_limit,
        )
    url, health = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health_port}"
    try:
        wait_for(f"{health}/v2/health/ready", proc, log)
        yield Server(url, port, health, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def infer_body(x: list[float], k: list[int] | None = None) -> dict:
    n = len(x) // 4
    return {
        "inputs": [
            {"name": "x", "shape": [n, 4], "datatype": "FP32", "data": x},
            {"name": "k", "shape": [n], "datatype": "INT32", "data": k or [0] * n},
        ]
    }


def read_until_closed(sock: socket.socket, limit: float) -> bytes:
    """What the server sends until it closes the connection (b"" if it only closes)."""
    sock.settimeout(limit)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


# ----------------------------------------------------------------------- flood


@dataclass
class Probes:
    """The kubelet: GET both health routes on the probe port every 50 ms."""

    url: str
    answers: list[tuple[str, int | str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while not self.stop.is_set():
                for path in ("/v2/health/live", "/v2/health/ready"):
                    try:
                        # The kubelet opens a connection per probe.
                        code: int | str = client.get(
                            path, headers={"connection": "close"}
                        ).status_code
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    self.answers.append((path, code))
                time.sleep(0.05)


def stalled_body(port: int) -> bytes:
    """Declares a 16 MiB body, sends all but its last byte, and waits for the answer.

    It looks for an early answer before sending the body: a refusal followed by
    a close while the body is still coming would reach it as a reset, losing
    the answer the test wants to see.
    """
    sock = connect(port)
    try:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {BODY}\r\n\r\n".encode()
        )
        if select.select([sock], [], [], 1.0)[0]:
            return read_until_closed(sock, 10)
        chunk = b" " * MiB
        with contextlib.suppress(OSError):  # refused bodies are closed under our feet
            for _ in range(BODY // MiB - 1):
                sock.sendall(chunk)
            sock.sendall(chunk[:-1])
        return read_until_closed(sock, 30)
    finally:
        sock.close()


def test_flood_keeps_memory_bounded_and_probes_answering(tiny: Path, tmp_path: Path) -> None:
    timeouts = ("--body-timeout", "--header-timeout", "--keep-alive-timeout")
    args = [a for t in timeouts for a in (t, str(TIMEOUT))]
    with serve(tiny, tmp_path, *args) as srv:
        base = rss(srv.proc.pid)
        peak = [base]
        probes = Probes(srv.health)
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], rss(srv.proc.pid))
                time.sleep(0.02)

        threads = [threading.Thread(target=probes.run), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        held: list[socket.socket] = []
        try:
            # Keep-alive: one request, then silence; the server must end it.
            keep_alive = connect(srv.port)
            keep_alive.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            response = b""
            while not response.endswith(b'{"live":true}'):
                response += keep_alive.recv(4096)
            assert response.startswith(b"HTTP/1.1 200")
            # Idle: connected, never a byte.
            idle = [connect(srv.port) for _ in range(20)]
            # Slowloris: headers a few bytes at a time, never finished.
            slow = [connect(srv.port) for _ in range(5)]
            for s in slow:
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            # Headers that never end, sent fast.
            huge = connect(srv.port)
            with contextlib.suppress(OSError):
                huge.sendall(b"GET / HTTP/1.1\r\n" + b"x-filler: " + b"a" * 200_000)

            # Forty 16 MiB bodies at once, each stalled one byte short.
            with ThreadPoolExecutor(40) as pool:
                bodies = pool.map(stalled_body, [srv.port] * 40)
                # Meanwhile, more connections than 256 open files can hold.
                for _ in range(300):
                    s = socket.socket()
                    s.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        s.connect(("127.0.0.1", srv.port))
                    held.append(s)
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.sendall(b"host: x\r\n")
                answers = list(bodies)

            # "reset": the answer came while this client was still sending (a 408
            # to an admitted body on a slow machine), and the close reset it.
            statuses = sorted(a.split(b" ", 2)[1].decode() if a else "reset" for a in answers)
            # The budget admits four 16 MiB bodies at once; every other one is refused
            # before it is read, and the admitted ones time out one byte short. How
            # many are admitted in all depends on timing: on a loaded machine a body
            # that arrives after an admitted one timed out is admitted too (CI saw 35
            # refusals). The RSS bound below checks that the budget held.
            assert "503" in statuses, statuses
            assert set(statuses) <= {"503", "408", "reset"}, statuses

            assert read_until_closed(keep_alive, 10) == b""
            assert all(read_until_closed(s, 10) == b"" for s in idle)
            assert all(read_until_closed(s, 10).startswith(b"HTTP/1.1 408") for s in slow)
            assert read_until_closed(huge, 10).startswith(b"HTTP/1.1 431")
        finally:
            for s in held:
                s.close()
            probes.stop.set()
            sampling.set()
            for t in threads:
                t.join()

        failed = [a for a in probes.answers if a[1] != 200]
        assert probes.answers and not failed, failed[:10]
        print(f"RSS idle {base / MiB:.0f} MiB, peak {peak[0] / MiB:.0f} MiB")
        assert peak[0] - base < RSS_ALLOWANCE, (base, peak[0])

        # And it still serves, and says what it did.
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            resp = client.post(INFER, json=infer_body([1.0, -2.0, 3.0, -4.0]))
            metrics = metric_samples(client.get("/metrics").text)
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == [1.0, 0.0, 3.0, 0.0]
        closed = "edgeslim_serving_connections_closed_total"
        for reason in ("evicted", "header_timeout", "header_too_large"):
            assert metrics[(closed, (("reason", reason),))] >= 1, reason
        assert metrics[("edgeslim_serving_body_bytes_reserved", ())] == 0
        requests = "edgeslim_serving_requests_total"
        refused = metrics[(requests, (("code", "503"), ("route", "infer")))]
        timed_out = metrics[(requests, (("code", "408"), ("route", "infer")))]
        # The server answered every body (a "reset" client saw one of these too).
        assert refused + timed_out >= 40, (refused, timed_out, statuses)
        assert refused >= statuses.count("503") and timed_out >= max(1, statuses.count("408"))
        log = srv.log.read_text()
        assert "Too many open files" not in log and "Traceback" not in log, log


# -------------------------------------------------------------------- limits


def test_limits_fit_the_open_file_limit() -> None:
    wanted = ServingLimits(health_port=8081)
    fitted = fit_to_open_files(wanted, nofile=FD_LIMIT, in_use=12)
    worst = (
        12
        + FD_HEADROOM
        + 2  # the listening sockets
        + HEALTH_MAX_CONNECTIONS
        + fitted.max_connections
        + 2 * fitted.backlog  # each listener's queue, accepted in one batch
    )
    assert worst <= FD_LIMIT and fitted.max_connections >= 100, fitted
    assert fit_to_open_files(wanted, nofile=1 << 20, in_use=12) == wanted  # room: as asked
    with pytest.raises(BadInput, match=r"open-file limit \(64\).*ulimit -n"):
        fit_to_open_files(wanted, nofile=64, in_use=12)


def test_cli_refuses_limits_that_cannot_work(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_args = ["serve", "--model", "m.onnx", "--name", NAME]
    assert main([*serve_args, "--max-inflight-body-bytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--max-inflight-body-bytes 1000 is below --max-body-bytes 16777216" in err
    assert len(err.strip().splitlines()) == 1, err
    assert main([*serve_args, "--body-timeout", "0"]) == 2
    assert "--body-timeout must be > 0" in capsys.readouterr().err
    assert main([*serve_args, "--port", "9000", "--health-port", "9000"]) == 2
    assert "--health-port" in capsys.readouterr().err
    # Defaults come from the environment, checked like flags.
    monkeypatch.setenv("EDGESLIM_SERVE_HEADER_TIMEOUT", "soon")
    with pytest.raises(SystemExit) as exit_:
        main(serve_args)
    assert exit_.value.code == 2
    assert "--header-timeout: invalid float value: 'soon'" in capsys.readouterr().err


# ------------------------------------------------------------------ overflow


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny, tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"1e39", "value 1e+39 is not a finite FP32"),
        (b"-3.5e38", "value -3.5e+38 is not a finite FP32"),
        (b"1" + b"0" * 39, "value 1e+39 is not a finite FP32"),  # an integer literal
    ],
)
def test_values_beyond_fp32_get_400_naming_the_tensor(
    server: Server, raw: bytes, message: str
) -> None:
    # Written by hand: a JSON encoder would refuse some of these values itself.
    body = (
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,' + raw + b"]},"
        b'{"name":"k","shape":[1],"datatype":"INT32","data":[0]}]}'
    )
    resp = httpx.post(server.url + INFER, content=body, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith(f"input 'x': {message}"), resp.text


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_nan_and_infinity_literals_are_refused(server: Server, literal: bytes) -> None:
    body = (
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,' + literal + b"]},"
        b'{"name":"k","shape":[1],"datatype":"INT32","data":[0]}]}'
    )
    resp = httpx.post(server.url + INFER, content=body, timeout=10)
    assert resp.status_code == 400, resp.text
    assert "JSON" in resp.json()["error"], resp.text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2**31, "input 'k': values from 2147483648 to 2147483648 do not fit INT32"),
        (2**70, "input 'k': values from 1.1805916207174113e+21 to 1.1805916207174113e+21 do not"),
    ],
)
def test_integers_beyond_their_type_get_400_naming_the_tensor(
    server: Server, value: int, message: str
) -> None:
    resp = httpx.post(server.url + INFER, json=infer_body([0.0] * 4, [value]), timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith(message), resp.text


def test_probe_port_answers_health_only_and_oversized_bodies_are_refused_unread(
    server: Server,
) -> None:
    assert httpx.get(server.health + "/v2/health/live").status_code == 200
    resp = httpx.post(server.health + INFER, json=infer_body([0.0] * 4))
    assert resp.status_code == 404 and "probe port" in resp.json()["error"]
    with connect(server.port) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY + 1}\r\n\r\n".encode()
        )
        answer = read_until_closed(sock, 10)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer, answer


def test_an_answer_left_unread_is_dropped(tiny: Path, tmp_path: Path) -> None:
    """A client that asks for a big answer and never reads it does not hold it for ever."""
    values = 4 * MiB  # an 8 MiB body of zeros; the answer, "0.0," each, is 16 MiB
    body = (
        b'{"inputs":[{"name":"x","shape":[%d,4],"datatype":"FP32","data":[' % (values // 4)
        + b"0," * (values - 1)
        + b'0]},{"name":"k","shape":[%d],"datatype":"INT32","data":[' % (values // 4)
        + b"0," * (values // 4 - 1)
        + b"0]}]}"
    )
    with serve(tiny, tmp_path, "--body-timeout", str(TIMEOUT)) as srv:
        sock = socket.socket()
        # A small receive window: the answer cannot hide in this side's buffers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        closed = ("edgeslim_serving_connections_closed_total", (("reason", "answer_not_read"),))
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            while metric_samples(client.get("/metrics").text).get(closed, 0) < 1:
                assert time.monotonic() < deadline, "the unread answer was never dropped"
                time.sleep(0.2)
        received = read_until_closed(sock, 10)  # part of the answer, then the close
        sock.close()
        assert received.startswith(b"HTTP/1.1 200") and len(received) < 16 * MiB
