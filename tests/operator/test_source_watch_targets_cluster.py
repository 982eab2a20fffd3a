"""A source replaced in S3 under an object with two spec.targets, on the real control
plane with the real compressor: a check asked for by annotation starts exactly one
new Job per target, each target's Deployment keeps its old artifact while that Job
runs (held in the node agent until the test has looked) and moves to the new one
only once the Job passed; each target's entry records the new source and its history.

The operator's periodic checks are off (EDGESLIM_SOURCE_CHECK_SECONDS=0): only the
`edgeslim.io/check-source` annotation checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.operator.support import (
    create_model,
    digits_in_s3,
    get_model,
    model_body,
    model_jobs,
    wait_phase,
)
from tests.operator.test_source_watch_cluster import HeldCompressors, retrained, s3_etag

pytestmark = pytest.mark.cluster
TIMEOUT = 300  # real compressor runs, two at a time, on a small busy machine
SHA_ANNOTATION = "edgeslim.io/artifact-sha256"
TARGET_LABEL = "edgeslim.io/target"
NAMES = ("x86", "accel")
Obj = dict[str, Any]


def served_sha(k8s: K8s, namespace: str, target: str) -> str:
    dep = k8s.apps.read_namespaced_deployment(f"digits-{target}", namespace)
    return dep.spec.template.metadata.annotations[SHA_ANNOTATION]


def entries(k8s: K8s, namespace: str) -> dict[str, Obj]:
    return {t["name"]: t for t in get_model(k8s, namespace, "digits")["status"]["targets"]}


def jobs_by_target(k8s: K8s, namespace: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {n: set() for n in NAMES}
    for j in model_jobs(k8s, namespace, "digits"):
        out[j.metadata.labels[TARGET_LABEL]].add(j.metadata.name)
    return out


def passed(k8s: K8s, namespace: str, job: str) -> bool:
    j = k8s.batch.read_namespaced_job(job, namespace)
    return any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or [])


def check_source(k8s: K8s, namespace: str, value: str) -> None:
    k8s.custom.patch_namespaced_custom_object(
        "edgeslim.io",
        "v1alpha1",
        namespace,
        "compressedmodels",
        "digits",
        {"metadata": {"annotations": {"edgeslim.io/check-source": value}}},
    )


@pytest.mark.slow
def test_a_replaced_source_recompresses_each_target_once_while_each_keeps_serving(
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
        op = run_operator(EDGESLIM_SOURCE_CHECK_SECONDS="0")
        body = model_body("digits", s3, max_drop=0.05)
        body["spec"]["deployment"] = {
            "replicas": 1,
            "nodeSelector": {"node-role.kubernetes.io/edge": ""},
            "progressDeadlineSeconds": 120,
        }
        body["spec"]["targets"] = [
            {"name": "x86", "quantize": {"mode": "dynamic"}},
            {"name": "accel", "quantize": {"mode": "fp16"}},
        ]
        create_model(k8s, namespace, body)

        # 1. Both targets serve their first artifact, made from the first source.
        wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
        first = entries(k8s, namespace)
        old_etag = s3_etag(s3_server, s3, "digits/cnn.onnx")
        old = {n: first[n]["artifact"]["sha256"] for n in NAMES}
        for n in NAMES:
            assert first[n]["servingArtifact"] == old[n] == served_sha(k8s, namespace, n)
            assert first[n]["source"]["etag"] == old_etag
            assert [h["trigger"] for h in first[n]["history"]] == ["SpecChanged"]
        before = jobs_by_target(k8s, namespace)
        assert all(len(js) == 1 for js in before.values()), before

        # 2. The source is replaced; one check asked for: one new Job per target.
        gate.hold.set()
        new_source = retrained(digits.model_path, tmp_path / "cnn-v2.onnx")
        s3_server.client().upload_file(str(new_source), s3, "digits/cnn.onnx")
        new_etag = s3_etag(s3_server, s3, "digits/cnn.onnx")
        assert new_etag != old_etag
        check_source(k8s, namespace, "replaced")
        wait_until(lambda: len(held) == 2, 90, 0.2, "both targets' re-compression pods")
        during = entries(k8s, namespace)
        now = jobs_by_target(k8s, namespace)
        for n in NAMES:
            [new_job] = now[n] - before[n]
            assert during[n]["jobName"] == new_job and new_job in held
            assert during[n]["phase"] in ("Queued", "Compressing")
            assert during[n]["recompression"]["reason"] == "SourceChanged"
            assert during[n]["recompression"]["source"]["etag"] == new_etag
            # The old artifact serves meanwhile: status and the Deployment's pods.
            assert during[n]["servingArtifact"] == old[n] == served_sha(k8s, namespace, n)
        said = sorted(
            e.message
            for e in k8s.core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=digits"
            ).items
            if e.reason == "SourceChanged"
        )
        assert len(said) == 2, said
        for n, m in zip(sorted(NAMES), said, strict=True):
            assert m.startswith(f"target {n}: ") and f"artifact {old[n][:12]} keeps" in m
        gate.release.set()

        # 3. Each Deployment moves to its new artifact, and only once its Job passed.
        def rolled_out() -> dict[str, Obj] | None:
            for n in NAMES:
                if served_sha(k8s, namespace, n) != old[n]:
                    [new_job] = now[n] - before[n]
                    assert passed(k8s, namespace, new_job), f"{n} rolled out before its Job"
            st = entries(k8s, namespace)
            done = all(
                st[n]["phase"] == "Ready" and st[n].get("servingArtifact") not in (None, old[n])
                for n in NAMES
            )
            return st if done else None

        final = wait_until(rolled_out, TIMEOUT, 0.5, "both targets' new artifacts to serve")
    for n in NAMES:
        t, new_sha = final[n], final[n]["artifact"]["sha256"]
        assert t["servingArtifact"] == new_sha == served_sha(k8s, namespace, n)
        assert t["source"]["etag"] == new_etag and "recompression" not in t
        # Stored beside the old artifact: same spec hash, a new inputs-id folder.
        prefix = f"s3://{s3}/edge/{namespace}/digits/{t['specHash']}/"
        old_uri, new_uri = first[n]["artifact"]["uri"], t["artifact"]["uri"]
        assert old_uri.startswith(prefix) and new_uri.startswith(prefix) and old_uri != new_uri
        assert [(h["trigger"], h["source"]["etag"], h["artifactSha256"]) for h in t["history"]] == [
            ("SpecChanged", old_etag, old[n]),
            ("SourceChanged", new_etag, new_sha),
        ]
    assert get_model(k8s, namespace, "digits")["status"]["targetsReady"] == "2/2"

    # 4. Exactly once: another check finds the new source recorded and starts nothing.
    checked = {n: final[n]["source"]["checkedAt"] for n in NAMES}
    check_source(k8s, namespace, "after-rollout")
    wait_until(
        lambda: all(entries(k8s, namespace)[n]["source"]["checkedAt"] != checked[n] for n in NAMES),
        60,
        0.5,
        "a check after the rollout",
    )
    assert jobs_by_target(k8s, namespace) == now
    assert sorted(held) == sorted(j for n in NAMES for j in now[n] - before[n])
