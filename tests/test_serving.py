"""The edge model server over real HTTP: `edgeslim serve` in a child process on 127.0.0.1,
serving the digits CNN quantized to int8, talked to with httpx."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from edgeslim import storage
from edgeslim.api.spec import QuantizeConfig
from edgeslim.compressor.quantize import Quantize
from edgeslim.compressor.steps import StepContext

NAME = "digits"
INFER = f"/v2/models/{NAME}/infer"
BODY_LIMIT = 1_000_000  # small, so the 413 test needs no big upload


# ---------------------------------------------------------------------- helpers


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    url: str, proc: subprocess.Popen, log: Path, status: int = 200, timeout: float = 60
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            resp = httpx.get(url, timeout=2)
            if resp.status_code == status:
                return resp
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not {status} in {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def serve(
    model: str | Path, tmp: Path, *args: str, ready: bool = True, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`edgeslim serve` in a child process; waits for liveness (and readiness if asked)."""
    port = free_port()
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
                "--threads",
                "1",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/v2/health/live", proc, log)
        if ready:
            wait_for(f"{url}/v2/health/ready", proc, log)
        yield Server(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


def logits(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32"
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Int8:
    path: Path
    sha256: str
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="module")
def int8(digits, tmp_path_factory: pytest.TempPathFactory) -> Int8:
    tmp = tmp_path_factory.mktemp("int8")
    ctx = StepContext(
        source=digits.model(),
        workdir=tmp,
        load_dataset=None,
        load_model=None,  # type: ignore[arg-type]
        evaluation_dataset=str(digits.val),
        train_datasets=[],
    )
    model = Quantize(QuantizeConfig(mode="dynamic")).run(digits.model(), ctx).model
    path = tmp / "model.onnx"
    onnx.save(model, path)
    val = np.load(digits.val)
    return Int8(path, hashlib.sha256(path.read_bytes()).hexdigest(), val["x"], val["y"])


@pytest.fixture(scope="module")
def server(int8: Int8, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(
        int8.path,
        tmp_path_factory.mktemp("serve"),
        "--sha256",
        int8.sha256,
        "--max-body-bytes",
        str(BODY_LIMIT),
    ) as srv:
        yield srv


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


# ------------------------------------------------------------------ happy paths


def test_classifies_known_digits_like_onnxruntime_in_process(
    client: httpx.Client, int8: Int8
) -> None:
    x, y = int8.x[:100], int8.y[:100]
    got = logits(client.post(INFER, json={"inputs": [tensor(x)], "id": "batch-1"}))
    assert got.shape == (100, 10)
    expected = ort.InferenceSession(str(int8.path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[0]
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == y).mean() >= 0.95


def test_single_samples_flat_or_nested_match_the_batch(client: httpx.Client, int8: Int8) -> None:
    x = int8.x[:3]
    batch = logits(client.post(INFER, json={"inputs": [tensor(x)]}))
    for i in range(3):
        flat = client.post(INFER, json={"inputs": [tensor(x[i : i + 1])]})
        nested = client.post(
            INFER,
            json={
                "inputs": [
                    {**tensor(x[i : i + 1]), "data": x[i : i + 1].tolist()}  # [[[[...]]]]
                ]
            },
        )
        # Dynamic int8 picks activation scales per batch, so a sample alone and in
        # a batch differ slightly; the class must not.
        assert logits(flat)[0].argmax() == batch[i].argmax()
        np.testing.assert_allclose(logits(flat)[0], batch[i], atol=0.25)
        np.testing.assert_array_equal(logits(nested), logits(flat))


def test_response_carries_model_version_id_and_requested_outputs(
    client: httpx.Client, int8: Int8
) -> None:
    resp = client.post(
        INFER, json={"id": "req-7", "inputs": [tensor(int8.x[:2])], "outputs": [{"name": "logits"}]}
    )
    doc = resp.json()
    assert doc["model_name"] == NAME
    assert doc["model_version"] == int8.sha256[:12]
    assert doc["id"] == "req-7"
    assert [o["name"] for o in doc["outputs"]] == ["logits"]
    assert doc["outputs"][0]["shape"] == [2, 10]
    # the versioned path serves the same model
    versioned = client.post(
        f"/v2/models/{NAME}/versions/{int8.sha256[:12]}/infer",
        json={"inputs": [tensor(int8.x[:2])]},
    )
    np.testing.assert_array_equal(logits(versioned), logits(resp))


def test_metadata_and_health(client: httpx.Client, int8: Int8) -> None:
    meta = client.get(f"/v2/models/{NAME}")
    assert meta.status_code == 200
    assert meta.json() == {
        "name": NAME,
        "versions": [int8.sha256[:12]],
        "platform": "onnxruntime",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{NAME}/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "edgeslim"


# ---------------------------------------------------------------- bad requests

GOOD = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}


def _without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


BAD_REQUESTS = [
    pytest.param(b"{not json", ["malformed JSON"], id="malformed-json"),
    pytest.param(b"[1, 2]", ["must be a JSON object"], id="not-an-object"),
    pytest.param({}, ["missing field 'inputs'"], id="no-inputs"),
    pytest.param({"inputs": []}, ["'inputs' is empty"], id="empty-inputs"),
    pytest.param({"inputs": GOOD}, ["field 'inputs' must be an array"], id="inputs-not-array"),
    pytest.param(
        {"inputs": [{**GOOD, "shape": "1,1,8,8"}]},
        ["input 'input'", "field 'shape' must be an array"],
        id="shape-not-array",
    ),
    pytest.param(
        {"inputs": [_without("shape")]}, ["input 'input'", "missing field 'shape'"], id="no-shape"
    ),
    pytest.param(
        {"inputs": [_without("data")]}, ["input 'input'", "missing field 'data'"], id="no-data"
    ),
    pytest.param(
        {"inputs": [_without("datatype")]}, ["missing field 'datatype'"], id="no-datatype"
    ),
    pytest.param(
        {"inputs": [_without("name")]}, ["inputs[0]", "missing field 'name'"], id="no-name"
    ),
    pytest.param(
        {"inputs": [{**GOOD, "shape": [1, 64]}]},
        ["input 'input'", "shape [1, 64]", "model's [-1, 1, 8, 8]"],
        id="wrong-rank",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "shape": [1, 1, 4, 16]}]},
        ["shape [1, 1, 4, 16]", "[-1, 1, 8, 8]"],
        id="wrong-dims",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "datatype": "FP64"}]},
        ["input 'input'", "datatype FP64", "model's FP32"],
        id="wrong-datatype",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "datatype": "FLOAT"}]},
        ["unknown datatype 'FLOAT'"],
        id="unknown-datatype",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "name": "image"}]},
        ["unknown input 'image'", "'input' (FP32 [-1, 1, 8, 8])"],
        id="unknown-input",
    ),
    pytest.param({"inputs": [GOOD, GOOD]}, ["'input' is given more than once"], id="duplicate"),
    pytest.param(
        {"inputs": [{**GOOD, "shape": [2, 1, 8, 8]}]},
        ["input 'input'", "needs 128 values, data has 64"],
        id="data-too-short",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "data": [0.0] * 65}]},
        ["needs 64 values, data has 65"],
        id="data-too-long",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "data": ["0.5"] * 64}]},
        ["input 'input'", "FP32 expects numbers", "got strings"],
        id="strings",
    ),
    pytest.param(
        {"inputs": [{**GOOD, "data": [[0.0] * 8] * 7 + [[0.0] * 7]}]}, ["ragged"], id="ragged"
    ),
    pytest.param(
        {"inputs": [{**GOOD, "shape": [1, 1, 8, -8]}]}, ["non-negative integers"], id="negative-dim"
    ),
    pytest.param(
        {"inputs": [GOOD], "outputs": [{"name": "probs"}]},
        ["unknown output 'probs'", "'logits'"],
        id="unknown-output",
    ),
    pytest.param({"inputs": [GOOD], "id": 7}, ["'id' must be a string"], id="id-not-string"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_REQUESTS)
def test_bad_requests_get_400_naming_what_is_wrong(
    client: httpx.Client, body: bytes | dict, expected: list[str]
) -> None:
    resp = (
        client.post(INFER, content=body)
        if isinstance(body, bytes)
        else client.post(INFER, json=body)
    )
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]
    for part in expected:
        assert part in message, (part, message)


def test_unknown_model_version_route_and_method(client: httpx.Client) -> None:
    resp = client.post("/v2/models/nope/infer", json={"inputs": [GOOD]})
    assert resp.status_code == 404 and "unknown model 'nope'" in resp.json()["error"]
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404
    resp = client.post(f"/v2/models/{NAME}/versions/v9/infer", json={"inputs": [GOOD]})
    assert resp.status_code == 404 and "no version 'v9'" in resp.json()["error"]
    assert client.get("/v1/models").status_code == 404
    resp = client.get(INFER)
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"


def test_body_over_the_limit_gets_413(server: Server) -> None:
    big = b'{"inputs": [' + b" " * BODY_LIMIT + b"]}"
    with server.client() as c:
        resp = c.post(INFER, content=big)
    assert resp.status_code == 413
    assert f"{BODY_LIMIT}-byte limit" in resp.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b" " * 65536

    with server.client() as c:
        resp = c.post(INFER, content=chunks())
    assert resp.status_code == 413


def test_integer_inputs_and_missing_inputs(tmp_path: Path) -> None:
    """A two-input model with an INT64 input: the checks that digits alone can't show."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, ["n", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["a", "kf"], ["y"]),
        ],
        "g",
        [a, k],
        [y],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    a_t = {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}
    with serve(path, tmp_path) as srv, srv.client() as c:
        ok = c.post(
            INFER,
            json={
                "inputs": [
                    a_t,
                    {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [2, -1]},
                ]
            },
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["data"] == [2.0, 4.0, -3.0, -4.0]
        cases = [
            ([a_t], ["missing input 'k' (INT64 [-1, 1])"]),
            (
                [a_t, {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [1.5, 2]}],
                ["input 'k'", "INT64 expects integers", "got fractional numbers"],
            ),
            (
                [a_t, {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [True, False]}],
                ["INT64 expects integers", "got booleans"],
            ),
            (
                [a_t, {"name": "k", "shape": [3, 1], "datatype": "INT64", "data": [1, 2, 3]}],
                ["the model rejected the inputs"],
            ),  # batch 2 vs 3: only the graph can tell
        ]
        for inputs, expected in cases:
            resp = c.post(INFER, json={"inputs": inputs})
            assert resp.status_code == 400, resp.text
            for part in expected:
                assert part in resp.json()["error"], (part, resp.json())


# --------------------------------------------------------------------- metrics


def test_metrics_count_requests_and_name_the_model(server: Server, int8: Int8) -> None:
    with server.client() as c:
        before = metric_samples(c.get("/metrics").text)
        for _ in range(3):
            assert c.post(INFER, json={"inputs": [tensor(int8.x[:1])]}).status_code == 200
        assert c.post(INFER, json={"inputs": []}).status_code == 400
        after = metric_samples(c.get("/metrics").text)
        assert c.get("/metrics").headers["content-type"].startswith("text/plain")

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("edgeslim_serving_requests_total", route="infer", code="200") == 3
    assert delta("edgeslim_serving_requests_total", route="infer", code="400") == 1
    assert delta("edgeslim_serving_request_duration_seconds_count") == 4
    assert delta("edgeslim_serving_inference_duration_seconds_count") == 3
    assert after[("edgeslim_serving_request_duration_seconds_sum", ())] > 0
    assert after[("edgeslim_serving_requests_in_flight", ())] == 0
    assert after[("edgeslim_serving_model_ready", ())] == 1
    info = (("name", NAME), ("sha256", int8.sha256))
    assert after[("edgeslim_serving_model_info", info)] == 1
    assert after[("edgeslim_serving_model_load_seconds", ())] > 0


# ------------------------------------------------------------------- readiness


def test_wrong_sha256_keeps_the_server_live_but_unready(int8: Int8, tmp_path: Path) -> None:
    with serve(int8.path, tmp_path, "--sha256", "0" * 64, ready=False) as srv, srv.client() as c:
        deadline = time.monotonic() + 30
        while (doc := c.get("/v2/health/ready").json()).get("state") == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert doc["state"] == "failed" and "sha256 mismatch" in doc["reason"]
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 503
        assert c.get("/v2/health/live").status_code == 200
        resp = c.post(INFER, json={"inputs": [GOOD]})
        assert resp.status_code == 503 and "not ready" in resp.json()["error"]
        assert c.get(f"/v2/models/{NAME}").status_code == 503
        metrics = metric_samples(c.get("/metrics").text)
        assert metrics[("edgeslim_serving_model_ready", ())] == 0
        assert metrics[("edgeslim_serving_model_load_failures_total", ())] == 1
        assert "sha256 mismatch" in srv.log_text()
        assert srv.proc.poll() is None  # still up: no restart loop


def test_corrupt_model_file_stays_unready(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with serve(bad, tmp_path, ready=False) as srv, srv.client() as c:
        wait_for(f"{srv.url}/v2/health/ready", srv.proc, srv.log, status=503)
        deadline = time.monotonic() + 30
        while c.get("/v2/health/ready").json()["state"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "onnxruntime cannot load it" in c.get("/v2/health/ready").json()["reason"]
        assert "onnxruntime cannot load it" in srv.log_text()


class GatedProxy:
    """A TCP proxy to S3 that holds every connection until ``open()``: a slow download."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.gate = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.waiting = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self.waiting += 1
        self.gate.wait(60)
        with conn, socket.create_connection(self.upstream) as up:
            done = threading.Event()

            def pump(src: socket.socket, dst: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        dst.sendall(data)
                done.set()

            threading.Thread(target=pump, args=(up, conn), daemon=True).start()
            pump(conn, up)
            done.wait(30)


def test_serves_from_s3_and_is_unready_until_the_download_lands(
    s3: str,
    s3_server,
    int8: Int8,
    tmp_path: Path,
) -> None:
    uri = f"s3://{s3}/models/digits/model.onnx"
    storage.put_file(int8.path, uri)
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = GatedProxy((host, int(port)))
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    try:
        with (
            serve(uri, tmp_path, "--sha256", int8.sha256, ready=False, env=env) as srv,
            srv.client() as c,
        ):
            deadline = time.monotonic() + 30
            while proxy.waiting == 0:  # the server is fetching, held at the gate
                assert time.monotonic() < deadline
                time.sleep(0.05)
            resp = c.get("/v2/health/ready")
            assert resp.status_code == 503 and resp.json()["state"] == "loading"
            assert c.get(f"/v2/models/{NAME}/ready").status_code == 503
            assert c.get("/v2/health/live").status_code == 200
            assert c.post(INFER, json={"inputs": [GOOD]}).status_code == 503
            proxy.open()
            wait_for(f"{srv.url}/v2/health/ready", srv.proc, srv.log)
            got = logits(c.post(INFER, json={"inputs": [tensor(int8.x[:10])]}))
            assert (got.argmax(1) == int8.y[:10]).mean() >= 0.9
    finally:
        proxy.close()


def test_unreachable_storage_keeps_loading_and_retrying(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_REGION": "us-east-1",
    }
    with (
        serve("s3://models/digits/model.onnx", tmp_path, ready=False, env=env) as srv,
        srv.client() as c,
    ):
        deadline = time.monotonic() + 30
        while "retrying" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.1)
        resp = c.get("/v2/health/ready")
        assert resp.status_code == 503
        assert resp.json()["state"] == "loading"  # not failed: the store may come back
        assert "storage unavailable" in resp.json()["reason"]
        assert c.get("/v2/health/live").status_code == 200


# ---------------------------------------------------------------- process level


def test_cli_refuses_a_malformed_sha256_before_starting(capsys: pytest.CaptureFixture) -> None:
    from edgeslim.cli import main

    assert main(["serve", "--model", "m.onnx", "--name", NAME, "--sha256", "abc"]) == 2
    assert "--sha256 'abc': expected 64 hexadecimal characters" in capsys.readouterr().err
    assert main(["serve", "--model", "m.onnx", "--name", "a/b"]) == 2
    assert "--name 'a/b'" in capsys.readouterr().err


def test_serving_imports_neither_torch_nor_onnx() -> None:
    code = (
        "import sys\n"
        "import edgeslim.serving, edgeslim.serving.app, edgeslim.serving.model\n"
        "import edgeslim.serving.protocol, edgeslim.serving.metrics, edgeslim.serving.server\n"
        "import edgeslim.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnx', 'torchvision', 'onnxscript', 'sklearn', 'kopf', 'kubernetes'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sigterm_lets_an_in_flight_request_finish(int8: Int8, tmp_path: Path) -> None:
    n = 8_000  # ~2 s of int8 compute on one thread: a wide window to send SIGTERM into
    x = np.resize(int8.x, (n, 1, 8, 8)).astype(np.float32)
    body = json.dumps({"inputs": [tensor(x)]}).encode()
    with serve(int8.path, tmp_path, "--max-body-bytes", str(len(body) + 1)) as srv:
        result: dict[str, httpx.Response] = {}

        def send() -> None:
            with srv.client() as c:
                result["resp"] = c.post(INFER, content=body)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 30
        with srv.client() as c:  # big requests run off the event loop, so /metrics answers
            while (
                metric_samples(c.get("/metrics").text)[("edgeslim_serving_requests_in_flight", ())]
                < 1
            ):
                assert time.monotonic() < deadline and sender.is_alive()
                time.sleep(0.005)
        srv.proc.send_signal(signal.SIGTERM)
        sender.join(60)
        assert srv.proc.wait(30) == 0, srv.log_text()
        got = logits(result["resp"])
        assert got.shape == (n, 10)
        with pytest.raises(httpx.TransportError):  # and it no longer accepts requests
            httpx.get(f"{srv.url}/v2/health/live", timeout=2)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2
        ({"cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_default_threads_follow_the_container_cpu_quota(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    from edgeslim.cpus import available_cpus, cgroup_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_quota(tmp_path) == quota
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if quota is None else min(affinity, math.ceil(quota))
    assert available_cpus(tmp_path) == expected


@pytest.mark.parametrize("omp", ["3", "", "0", "lots"])
def test_compute_threads_take_omp_num_threads_else_the_cpus_available(
    omp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distillation sizes torch by this: a pod's quota, not the node's cores."""
    from edgeslim.cpus import available_cpus, compute_threads

    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert compute_threads() == (3 if omp == "3" else available_cpus())
