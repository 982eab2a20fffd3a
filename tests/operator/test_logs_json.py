"""`edgeslim operator` with EDGESLIM_LOG_FORMAT=json on a real API server: every
line it writes is a JSON object, and kopf's per-object lines name the object."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.processes import wait_until
from tests.operator.support import Operator, create_model, model_body, wait_phase


@pytest.mark.cluster
def test_operator_writes_json_lines(
    k8s: K8s, namespace: str, run_operator: Callable[..., Operator]
) -> None:
    op = run_operator(EDGESLIM_LOG_FORMAT="json")
    # The CRD accepts this; pydantic does not (bits belong to weightOnly): the
    # operator marks it Failed / InvalidSpec without a Job, and logs about it.
    body = model_body("bad-bits", "bench", pipeline=[{"quantize": {"mode": "static", "bits": 4}}])
    create_model(k8s, namespace, body)
    failed = wait_phase(k8s, namespace, "bad-bits", {"Failed"}, 60, op)
    assert failed["status"]["conditions"]

    def about_the_object() -> list[dict] | None:
        lines = [json.loads(x) for x in op.log_path.read_text().splitlines() if x.strip()]
        named = [x for x in lines if x.get("object", {}).get("name") == "bad-bits"]
        return lines if named else None

    lines = wait_until(about_the_object, 30, 0.2, "a log line about bad-bits")
    named = [x for x in lines if x.get("object", {}).get("name") == "bad-bits"]
    assert named[0]["object"]["namespace"] == namespace
    assert named[0]["object"]["kind"] == "CompressedModel"
    assert {"time", "level", "logger", "message"} <= set(named[0])
