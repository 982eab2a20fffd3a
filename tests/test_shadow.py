"""A canary server (`edgeslim serve --shadow-url`) answers from its own model and
compares a sample of requests with a stable server in the background: real server
processes, the digits model, a copy with the same answers and one with its output
classes permuted."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeslim.serving.shadow import agreement
from tests.canary_models import permuted_classes, same_answers
from tests.test_serving import INFER, logits, metric_samples, serve, tensor

COMPARED = ("edgeslim_serving_shadow_requests_total", (("result", "compared"),))
ERRORS = ("edgeslim_serving_shadow_requests_total", (("result", "error"),))
AGREEMENT = ("edgeslim_serving_shadow_agreement_sum_total", ())


def _shadow_counts(client: httpx.Client, want: int, key: tuple = COMPARED) -> dict:
    """The canary's metrics once `want` shadow requests ended (they run in the background)."""
    deadline = time.monotonic() + 30
    while True:
        samples = metric_samples(client.get("/metrics").text)
        if samples.get(key, 0) >= want or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.mark.parametrize(("build", "expected"), [(same_answers, 1.0), (permuted_classes, 0.0)])
def test_canary_answers_itself_and_counts_agreement_with_stable(
    digits, tmp_path: Path, build, expected: float
) -> None:
    canary_path = tmp_path / "canary.onnx"
    canary_path.write_bytes(build(digits.model()))
    x = np.load(digits.val)["x"][:20]
    with (
        serve(digits.model_path, tmp_path) as stable,
        serve(
            canary_path,
            tmp_path,
            "--shadow-url",
            stable.url,
            "--shadow-sample-rate",
            "1",
        ) as canary,
        stable.client() as sc,
        canary.client() as cc,
    ):
        for i in range(20):
            body = {"inputs": [tensor(x[i : i + 1])]}
            own = logits(cc.post(INFER, json=body))
            theirs = logits(sc.post(INFER, json=body))
            # The client gets the canary's own answer, whatever the stable one says.
            assert (own.argmax() == theirs.argmax()) == (expected == 1.0)
        samples = _shadow_counts(cc, 20)
        assert samples[COMPARED] == 20
        assert samples[AGREEMENT] == pytest.approx(20 * expected)
        stable_requests = metric_samples(sc.get("/metrics").text)
        # 20 from the test, 20 in shadow from the canary.
        assert (
            stable_requests[
                ("edgeslim_serving_requests_total", (("code", "200"), ("route", "infer")))
            ]
            == 40
        )


def test_a_stable_server_that_is_gone_changes_nothing_but_the_error_count(
    digits, tmp_path: Path
) -> None:
    x = np.load(digits.val)["x"][:5]
    with (
        # Every request in shadow: at the default 0.1, five requests sample none 59% of the time.
        serve(
            digits.model_path,
            tmp_path,
            "--shadow-url",
            "http://127.0.0.1:9",
            "--shadow-sample-rate",
            "1",
        ) as canary,
        canary.client() as cc,
    ):
        for i in range(5):
            assert logits(cc.post(INFER, json={"inputs": [tensor(x[i : i + 1])]})).shape == (1, 10)
        samples = _shadow_counts(cc, 1, ERRORS)
        assert samples[ERRORS] >= 1
        assert samples.get(COMPARED, 0) == 0


def test_a_malformed_shadow_url_is_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "serve", "--model", "m.onnx", "--name", "m",
         "--shadow-url", "ftp://stable"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "shadow URL 'ftp://stable': expected http://host:port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_agreement_top1_for_classes_cosine_otherwise() -> None:
    a = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert agreement(a, np.array([[0.0, 1.0], [0.0, 1.0]])) == 0.5
    assert agreement(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(1.0)
    assert agreement(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.0)
    assert agreement(a, np.zeros((3, 2))) == 0.0  # another shape never agrees
