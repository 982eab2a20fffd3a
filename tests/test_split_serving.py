"""A split model served as a chain: one `edgeslim serve` process per part on 127.0.0.1,
each given the next part's endpoint; a client calls part 0 and gets the whole model's
outputs, and part 0 is ready only while the whole chain is."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeslim.compressor import split as sp
from tests.test_serving import NAME, Server, serve, tensor

INFER = f"/v2/models/{NAME}/infer"


@contextlib.contextmanager
def chain(paths: list[Path], tmp: Path) -> Iterator[list[Server]]:
    """One server per part, started from the last, each pointed at the next."""
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        for path in reversed(paths):
            env = dict(os.environ)
            if servers:
                env["EDGESLIM_NEXT_PART_URL"] = f"{servers[0].url}/v2/models/{NAME}"
            servers.insert(0, stack.enter_context(serve(path, tmp, env=env)))
        yield servers


def _write(result: sp.SplitResult, tmp: Path) -> list[Path]:
    paths = []
    for part, record in zip(result.parts, result.plan.parts, strict=True):
        paths.append(tmp / record.file)
        paths[-1].write_bytes(part.SerializeToString())
    return paths


def _whole(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _output(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _wait_status(
    client: httpx.Client, path: str, status: int, timeout: float = 20
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(path)
        if resp.status_code == status or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


def test_three_part_chain_answers_like_the_whole_model_and_is_ready_as_a_chain(
    digits, tmp_path: Path
) -> None:
    model = digits.model()
    paths = _write(sp.split(model, 3), tmp_path)
    x = np.load(digits.val)["x"][:16]
    expected = _whole(model, {"input": x})
    with chain(paths, tmp_path) as (first, _middle, last), first.client() as client:
        body = {"id": "r-1", "inputs": [tensor(x)], "outputs": [{"name": "logits"}]}
        resp = client.post(INFER, json=body)
        np.testing.assert_allclose(_output(resp), expected, atol=1e-4)
        assert resp.json()["id"] == "r-1" and resp.json()["outputs"][0]["name"] == "logits"
        # part 0 describes the chain: its own inputs, the last part's outputs
        meta = client.get(f"/v2/models/{NAME}").json()
        assert [t["name"] for t in meta["inputs"]] == ["input"]
        assert [t["name"] for t in meta["outputs"]] == ["logits"]
        # an output the model lacks is the client's mistake, named by the last part
        bad = client.post(INFER, json={**body, "outputs": [{"name": "nope"}]})
        assert bad.status_code == 400 and "unknown output 'nope'" in bad.text
        assert client.get("/v2/health/ready").status_code == 200

        # the last part goes away: part 0 turns unready and says which part is missing
        last.proc.terminate()
        last.proc.wait(15)
        unready = _wait_status(client, "/v2/health/ready", 503)
        assert unready.status_code == 503, unready.text
        assert "next part" in unready.json()["reason"]
        failed = client.post(INFER, json=body)
        assert failed.status_code in (502, 503), failed.text
        assert "next part" in failed.json()["error"]
        assert client.get("/v2/health/live").status_code == 200


def test_two_part_bert_chain_sends_ids_masks_and_hidden_states(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.test_split import _bert

    model, feed = _bert()
    result = sp.split(model, 2)
    crossing = {t.dtype for t in result.plan.cuts[0].tensors}
    assert "float32" in crossing  # the hidden state, beside the mask
    paths = _write(result, tmp_path)
    expected = _whole(model, feed)
    with chain(paths, tmp_path) as (first, _last), first.client() as client:
        inputs = [tensor(feed[n], n, "INT64") for n in ("input_ids", "attention_mask")]
        resp = client.post(INFER, json={"inputs": inputs})
        np.testing.assert_allclose(_output(resp), expected, atol=1e-4)


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A port that accepts connections and never answers: a next part that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(sock.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        sock.close()


def test_a_hung_next_part_costs_at_most_the_timeout(digits, tmp_path: Path) -> None:
    paths = _write(sp.split(digits.model(), 2), tmp_path)
    x = np.load(digits.val)["x"][:2]
    with (
        silent_listener() as url,
        serve(
            paths[0], tmp_path, "--next-part-url", url, "--next-part-timeout", "1", ready=False
        ) as first,
        first.client() as client,
    ):
        deadline = time.monotonic() + 30
        while True:  # until this part's own model has loaded
            resp = client.post(INFER, json={"inputs": [tensor(x)]})
            if resp.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert resp.status_code == 504, resp.text
        assert "did not answer in 1 s" in resp.json()["error"]
        ready = client.get("/v2/health/ready")  # its model is loaded, the next part hangs
        assert ready.status_code == 503
        assert ready.json()["state"] == "waiting" and "unreachable" in ready.json()["reason"]
        assert client.get("/v2/health/live").status_code == 200


def test_a_malformed_next_part_url_is_refused_before_serving(
    capsys: pytest.CaptureFixture,
) -> None:
    from edgeslim.cli import main

    for url in ("ftp://part-1:8080", "http://part-1:8080/v1/models/m", "http://:80"):
        assert main(["serve", "--model", "m.onnx", "--name", NAME, "--next-part-url", url]) == 2
        assert "next part URL" in capsys.readouterr().err
