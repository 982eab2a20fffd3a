"""Log lines as JSON (EDGESLIM_LOG_FORMAT=json): one object per line, credentials
masked, kopf's object reference kept; `edgeslim serve` writes them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeslim import logs
from edgeslim.errors import BadInput
from edgeslim.operator.serving import build_deployment
from edgeslim.operator.settings import Settings

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("edgeslim.operator", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_parses_and_masks_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    record = _record(
        "fetch %s failed with key %s\nsecond line",
        "http://admin:hunter22@minio:9000/models/a.onnx?X-Amz-Signature=abcdef123456",
        SECRET,
    )
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line  # one record, one line
    out = json.loads(line)
    assert out["level"] == "WARNING" and out["logger"] == "edgeslim.operator"
    assert out["message"] == (
        "fetch http://***@minio:9000/models/a.onnx?X-Amz-Signature=*** failed with key ***"
        "\nsecond line"
    )
    assert out["time"].endswith("Z") and out["time"][10] == "T"
    assert SECRET not in line and "hunter22" not in line


def test_exceptions_and_kopf_object_references_become_fields() -> None:
    try:
        raise RuntimeError("password=hunter22 rejected")
    except RuntimeError:
        record = _record("handler failed", exc_info=sys.exc_info())
    ref = {"apiVersion": "edgeslim.io/v1alpha1", "kind": "CompressedModel", "name": "digits",
           "namespace": "vision", "uid": None}  # fmt: skip
    record.k8s_ref = ref
    out = json.loads(logs.JsonFormatter().format(record))
    assert out["object"] == {k: v for k, v in ref.items() if v is not None}
    assert "RuntimeError: password=*** rejected" in out["exception"]


def test_the_format_setting() -> None:
    assert logs.log_format({}) == "text"
    assert logs.log_format({"EDGESLIM_LOG_FORMAT": " JSON "}) == "json"
    with pytest.raises(BadInput, match="EDGESLIM_LOG_FORMAT='yaml': expected one of text, json"):
        logs.log_format({"EDGESLIM_LOG_FORMAT": "yaml"})


def test_the_operator_hands_json_to_the_serving_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.operator.test_serving import NEW, model

    def env(settings: Settings) -> dict[str, str]:
        [c] = build_deployment(model(), NEW, settings)["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}

    # The default leaves the template (and so every running Deployment) as it was.
    assert "EDGESLIM_LOG_FORMAT" not in env(Settings())
    monkeypatch.setenv("EDGESLIM_LOG_FORMAT", "json")
    assert env(Settings.from_env())["EDGESLIM_LOG_FORMAT"] == "json"


OPERATOR_LOGGING = """
import logging
from edgeslim import logs
from edgeslim.operator.main import configure_logging
configure_logging(logs.log_format())   # what `edgeslim operator` does before kopf starts
ref = {"kind": "CompressedModel", "namespace": "vision", "name": "digits"}
logging.getLogger("kopf.objects").warning(
    "s3 said %s", "http://key:hunter22@minio:9000", extra={"k8s_ref": ref}
)
logging.getLogger("edgeslim.operator").warning("plain")
"""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_operator_logging_through_kopf(fmt: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", OPERATOR_LOGGING],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGESLIM_LOG_FORMAT": fmt},
        timeout=60,
        check=True,
    )
    lines = done.stderr.strip().splitlines()
    assert "hunter22" not in done.stderr and len(lines) == 2
    if fmt == "text":  # kopf's own format, with its [namespace/name] prefix
        assert "[vision/digits] s3 said http://***@minio:9000" in lines[0]
        return
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "s3 said http://***@minio:9000"
    assert first["object"] == {"kind": "CompressedModel", "namespace": "vision", "name": "digits"}
    assert (second["logger"], second["message"]) == ("edgeslim.operator", "plain")


def test_edgeslim_serve_logs_json_lines(tmp_path: Path) -> None:
    from tests.test_serving import free_port

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeslim.cli", "serve", "--model", str(bad), "--name", "m",
             "--host", "127.0.0.1", "--port", str(free_port()), "--threads", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EDGESLIM_LOG_FORMAT": "json"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "onnxruntime cannot load it" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    failed = [x for x in lines if "onnxruntime cannot load it" in x["message"]]
    assert failed and failed[0]["level"] in ("ERROR", "WARNING")
    assert failed[0]["logger"].startswith("edgeslim.serving")


def test_a_bad_format_stops_edgeslim_serve_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "serve", "--model", str(tmp_path / "m.onnx"),
         "--name", "m", "--port", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGESLIM_LOG_FORMAT": "yaml"},
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "edgeslim: error: EDGESLIM_LOG_FORMAT='yaml': expected one of text, json"
    ]
