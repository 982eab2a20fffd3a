"""spec.optimize through the operator: a real compressor Job runs the search and
status.results carries what the search found (candidatesTried, the Pareto front)."""

from __future__ import annotations

import pytest

from tests.cluster.fixtures import K8s
from tests.operator.support import condition, create_model, digits_in_s3, model_body, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TIMEOUT = 300


def test_an_optimize_spec_reports_its_search_in_status(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    bucket = s3_server.client()
    op = run_operator()
    body = model_body("searched", s3, max_drop=0.01)
    del body["spec"]["pipeline"]
    body["spec"]["optimize"] = {"objective": "download", "maxCandidates": 3}
    create_model(k8s, namespace, body)

    ready = wait_phase(k8s, namespace, "searched", {"Ready"}, TIMEOUT, op)
    assert condition(ready, "GatePassed")["status"] == "True"
    results = ready["status"]["results"]
    assert results["candidatesTried"] == 3
    assert 1 <= len(results["pareto"]) <= 3
    assert all({"index", "name", "gzipSizeBytes", "drop"} <= set(p) for p in results["pareto"])
    assert results["downloadRatio"] > 3
    manifest_uri = ready["status"]["artifact"]["manifestUri"]
    key = manifest_uri.removeprefix(f"s3://{s3}/")
    listed = bucket.list_objects_v2(Bucket=s3, Prefix=key.rsplit("/", 1)[0])
    names = {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
    assert {"manifest.json", "model.onnx"} <= names
