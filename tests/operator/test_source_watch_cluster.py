"""A source model replaced in S3 at the same URI, on the real control plane: the
operator notices it (HEAD with the object's Secret), compresses it again exactly
once with the real compressor, and the artifact serving keeps serving (status and
the Deployment's pods) until the new one passes the gate; history keeps both.

The re-compression's pod is held in the node agent until the test has looked at
what serves meanwhile (and killed and restarted the operator), then runs for
real. The operator checks sources every 2 s (EDGESLIM_SOURCE_CHECK_SECONDS on
the test operator; the spec's minimum is 60).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent, PodOutcome
from tests.cluster.processes import wait_until
from tests.operator.support import (
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    model_jobs,
    wait_phase,
)

pytestmark = pytest.mark.cluster
TIMEOUT = 240  # a real compressor run on a small, busy machine
SHA_ANNOTATION = "edgeslim.io/artifact-sha256"
Obj = dict[str, Any]


class HeldCompressors:
    """A node-agent hook: once `hold` is set, each compressor pod waits (before it runs
    for real) until `release` is set; `jobs` names the Jobs whose pods it held."""

    def __init__(self) -> None:
        self.hold, self.release = threading.Event(), threading.Event()
        self.jobs: list[str] = []

    def hook(self, pod: Obj) -> PodOutcome | None:
        labels = pod["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/component") == "compressor" and self.hold.is_set():
            self.jobs.append(labels.get("job-name", ""))
            self.release.wait(TIMEOUT)
        return None  # then run for real


def retrained(src: Path, dest: Path) -> Path:
    """The same network with slightly other weights, as a retrained export would be."""
    model = onnx.load(str(src))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    scaled = numpy_helper.to_array(biggest) * np.float32(1.001)
    biggest.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), biggest.name))
    onnx.save(model, str(dest))
    return dest


def served_sha(k8s: K8s, namespace: str) -> str:
    dep = k8s.apps.read_namespaced_deployment("digits", namespace)
    return dep.spec.template.metadata.annotations[SHA_ANNOTATION]


def s3_etag(s3_server: Any, bucket: str, key: str) -> str:
    return s3_server.client().head_object(Bucket=bucket, Key=key)["ETag"]


@pytest.mark.slow
def test_a_replaced_source_is_recompressed_once_while_the_old_artifact_serves(
    k8s: K8s,
    namespace: str,
    run_operator,
    s3_server,
    s3: str,
    digits,
    node_agent: NodeAgent,
    tmp_path: Path,
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    gate = HeldCompressors()
    held = gate.jobs

    with node_agent.hooked(gate.hook):
        op = run_operator(EDGESLIM_SOURCE_CHECK_SECONDS="2")
        body = model_body("digits", s3)
        body["spec"]["deployment"] = {
            "replicas": 1,
            "nodeSelector": {"node-role.kubernetes.io/edge": ""},
            "progressDeadlineSeconds": 120,
        }
        create_model(k8s, namespace, body)

        # 1. The first artifact, with the source identity the compressor used.
        first = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)["status"]
        old_sha, old_etag = first["artifact"]["sha256"], s3_etag(s3_server, s3, "digits/cnn.onnx")
        assert first["servingArtifact"] == old_sha == served_sha(k8s, namespace)
        assert first["source"]["etag"] == old_etag
        assert (
            first["source"]["sha256"] == hashlib.sha256(digits.model_path.read_bytes()).hexdigest()
        )
        [entry] = first["history"]
        assert (entry["verdict"], entry["trigger"], entry["artifactSha256"]) == (
            "Passed",
            "SpecChanged",
            old_sha,
        )
        assert entry["versions"]["edgeslim"] and entry["versions"]["onnxruntime"]
        [job1] = model_jobs(k8s, namespace, "digits")

        # 2. The source is replaced at the same URI: one new Job, held before it runs.
        gate.hold.set()
        new_source = retrained(digits.model_path, tmp_path / "cnn-v2.onnx")
        s3_server.client().upload_file(str(new_source), s3, "digits/cnn.onnx")
        new_etag = s3_etag(s3_server, s3, "digits/cnn.onnx")
        assert new_etag != old_etag
        wait_until(lambda: held, 60, 0.2, "the re-compression's pod")
        during = get_model(k8s, namespace, "digits")["status"]
        assert during["phase"] == "Compressing"
        assert during["recompression"]["reason"] == "SourceChanged"
        assert during["recompression"]["source"]["etag"] == new_etag
        assert during["jobName"] == held[0] != job1.metadata.name
        # The old artifact serves meanwhile: status and the Deployment's pods.
        assert during["servingArtifact"] == old_sha == served_sha(k8s, namespace)
        said = [
            e.message
            for e in k8s.core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=digits"
            ).items
            if e.reason == "SourceChanged"
        ]
        assert len(said) == 1 and f"artifact {old_sha[:12]} keeps serving" in said[0], said
        # An operator killed now and started again adopts that Job: still one.
        op.kill()
        op = run_operator(EDGESLIM_SOURCE_CHECK_SECONDS="2")
        wait_until(
            lambda: f"adopted existing Job {held[0]}" in op.log_tail(50000),
            60,
            0.5,
            "the new operator to adopt the re-compression's Job",
        )
        gate.release.set()

        # 3. The new artifact passes and rolls out; the old one is still in storage.
        def rolled_out() -> Obj | None:
            st = get_model(k8s, namespace, "digits")["status"]
            ok = st.get("phase") == "Ready" and st.get("servingArtifact") not in (None, old_sha)
            return st if ok else None

        final = wait_until(rolled_out, TIMEOUT, 0.5, "the new artifact to serve")
    new_sha = final["artifact"]["sha256"]
    assert final["servingArtifact"] == new_sha == served_sha(k8s, namespace)
    assert final["source"]["etag"] == new_etag and "recompression" not in final
    assert final["artifact"]["uri"] != first["artifact"]["uri"]  # beside it, not over it
    old_key = first["artifact"]["uri"].removeprefix(f"s3://{s3}/")
    old_bytes = s3_server.client().get_object(Bucket=s3, Key=old_key)["Body"].read()
    assert hashlib.sha256(old_bytes).hexdigest() == old_sha
    # Lineage: both artifacts, each with the source bytes that made it.
    assert [(h["trigger"], h["source"]["etag"], h["artifactSha256"]) for h in final["history"]] == [
        ("SpecChanged", old_etag, old_sha),
        ("SourceChanged", new_etag, new_sha),
    ]

    # 4. Exactly one re-compression: a check asked for now finds the new source
    #    recorded and starts nothing.
    checked = final["source"]["checkedAt"]
    k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io",
        "v1alpha1",
        namespace,
        "compressedmodels",
        "digits",
        {"metadata": {"annotations": {"edgeslim.io/check-source": "after-rollout"}}},
    )
    wait_until(
        lambda: get_model(k8s, namespace, "digits")["status"]["source"]["checkedAt"] != checked,
        60,
        0.5,
        "a check after the rollout",
    )
    jobs = sorted(j.metadata.name for j in model_jobs(k8s, namespace, "digits"))
    assert jobs == sorted([job1.metadata.name, held[0]])
    assert held == [held[0]]
    last = get_model(k8s, namespace, "digits")["status"]
    assert last["phase"] == "Ready"
    # What an auditor reads (visible with -s).
    print(json.dumps({k: last[k] for k in ("source", "history")}, indent=2))
