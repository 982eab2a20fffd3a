"""The metric-gated canary of one spec.targets entry on the real control plane: the
operator as a process, real `edgeslim serve` pods, S3 (moto); artifacts from the
node-agent hook of test_canary_cluster, the same traffic.

An object with targets `a` and `b` serves the digits model on both. Target `a`
gets a new artifact (its quantize override changes, so only its spec hash does):

1. an agreeing one runs in `digits-a-canary` (the target's labels, compared in
   shadow with `a`'s stable pods only), is analysed in `a`'s status entry and
   promoted; `a`'s ordinary rollout takes over and the canary Deployment goes;
2. a permuted one is rolled back at its first step, recorded in `a`'s
   failedArtifacts.

Target `b` is never touched: same Deployment (generation), same pods, no canary.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.canary_models import permuted_classes, same_answers
from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.operator.support import (
    artifact_result_hook,
    create_model,
    digits_in_s3,
    get_model,
    kubectl,
    model_body,
    model_jobs,
    patch_spec,
    wait_phase,
)
from tests.operator.test_canary_cluster import CANARY, Traffic, event_reasons

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TIMEOUT = 180
TARGET = "edgeslim.io/target"
B_SERVING = f"{TARGET}=b,app.kubernetes.io/component=serving"


def entry(k8s: K8s, namespace: str, target: str) -> dict:
    st = get_model(k8s, namespace, "digits").get("status") or {}
    return next((t for t in st.get("targets") or [] if t["name"] == target), {})


def deployments(k8s: K8s, namespace: str) -> dict[str, object]:
    return {d.metadata.name: d for d in k8s.apps.list_namespaced_deployment(namespace).items}


def target_a(**quantize: object) -> list[dict]:
    return [{"name": "a", "quantize": {"mode": "dynamic", **quantize}}, {"name": "b"}]


def test_one_targets_canary_is_its_own_and_leaves_the_other_alone(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits, node_agent: NodeAgent
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()
    val = np.load(digits.val)
    samples = [(val["x"][i : i + 1], int(val["y"][i])) for i in range(40)]
    model = digits.model()
    body = model_body("digits", s3)
    body["spec"]["deployment"] = {
        "replicas": 2,
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "progressDeadlineSeconds": 60,
        "canary": {**CANARY, "steps": [50, 100]},
    }
    body["spec"]["targets"] = [{"name": "a"}, {"name": "b"}]
    with node_agent.hooked(artifact_result_hook(s3_server, model.SerializeToString())):
        create_model(k8s, namespace, body)
        wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
    b_before = entry(k8s, namespace, "b")
    b_dep = deployments(k8s, namespace)["digits-b"]
    b_pods = {
        p.metadata.uid
        for p in k8s.core.list_namespaced_pod(namespace, label_selector=B_SERVING).items
    }
    sha1 = entry(k8s, namespace, "a")["servingArtifact"]
    assert "canary" not in b_before and len(b_pods) == 2

    with Traffic(k8s, namespace, samples):
        # 1. An agreeing artifact for `a`: its own canary, promoted.
        with node_agent.hooked(artifact_result_hook(s3_server, same_answers(model))):
            generation = patch_spec(k8s, namespace, {"targets": target_a(perChannel=False)})

            def at_step() -> dict | None:
                a = entry(k8s, namespace, "a")
                c = a.get("canary") or {}
                return a if c.get("weight") == 50 and c.get("result") == "Running" else None

            a = wait_until(at_step, TIMEOUT, 0.3, "target a's canary at 50%")
            assert a["phase"] == "Deploying" and a["servingArtifact"] == sha1
            # The canary's status is written before its Deployment (a restarted
            # operator resumes from status), so the Deployment may come a moment later.
            canary_dep = wait_until(
                lambda: deployments(k8s, namespace).get("digits-a-canary"),
                30,
                0.3,
                "a's canary Deployment",
            )
            assert canary_dep.spec.selector.match_labels[TARGET] == "a"
            assert canary_dep.spec.template.metadata.labels["edgeslim.io/track"] == "canary"
            top = get_model(k8s, namespace, "digits")["status"]
            assert "canary" not in top and "a: canary: artifact" in top["message"]
            print(kubectl(k8s, namespace, "get", "compressedmodel,deploy"))
            promoted = wait_phase(
                k8s, namespace, "digits", {"Ready"}, TIMEOUT, op, generation=generation
            )
        a = next(t for t in promoted["status"]["targets"] if t["name"] == "a")
        sha2 = a["servingArtifact"]
        assert sha2 != sha1 and a["canary"]["artifact"] == sha2
        assert a["canary"]["result"] == "Promoted" and "shown" not in a["canary"]
        decided = [(x["weight"], x["verdict"]) for x in a["canary"]["analyses"]]
        assert decided[-1] == (50, "Promote") and a["canary"]["analyses"][-1]["agreement"] == 1.0
        wait_until(
            lambda: "digits-a-canary" not in deployments(k8s, namespace),
            60,
            0.5,
            "a's canary Deployment to go after the promotion",
        )

        # 2. A permuted artifact for `a`: rolled back at its first step.
        with node_agent.hooked(artifact_result_hook(s3_server, permuted_classes(model))):
            generation = patch_spec(
                k8s, namespace, {"targets": target_a(perChannel=False, opTypes=["Conv", "Gemm"])}
            )
            failed = wait_phase(
                k8s, namespace, "digits", {"Failed"}, TIMEOUT, op, generation=generation
            )
        a = next(t for t in failed["status"]["targets"] if t["name"] == "a")
        assert a["phase"] == "Failed" and a["servingArtifact"] == sha2
        sha3 = a["artifact"]["sha256"]
        bad = a["failedArtifacts"][-1]
        assert (bad["sha256"], bad["reason"]) == (sha3, "CanaryAnalysis")
        assert "< minAgreement 0.9" in bad["message"]
        assert (a["canary"]["artifact"], a["canary"]["result"]) == (sha3, "RolledBack")
        assert not failed["status"].get("failedArtifacts")  # recorded in a's entry only

        def back_on_stable() -> bool:
            deps = deployments(k8s, namespace)
            return set(deps) == {"digits-a", "digits-b"} and deps["digits-a"].spec.replicas == 2

        wait_until(back_on_stable, 60, 0.5, "a's canary gone, its stable Deployment at 2")
        print(kubectl(k8s, namespace, "get", "compressedmodel,deploy"))

    # `b` was never touched: its entry, Deployment, pods and Job are as they were.
    b = entry(k8s, namespace, "b")
    assert {k: b[k] for k in ("artifact", "servingArtifact", "specHash", "phase")} == {
        k: b_before[k] for k in ("artifact", "servingArtifact", "specHash", "phase")
    }
    assert "canary" not in b and not b.get("failedArtifacts")
    dep = deployments(k8s, namespace)["digits-b"]
    assert (dep.metadata.uid, dep.metadata.generation) == (
        b_dep.metadata.uid,
        b_dep.metadata.generation,
    )
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=B_SERVING).items
    assert {p.metadata.uid for p in pods} == b_pods
    assert (
        len([j for j in model_jobs(k8s, namespace, "digits") if j.metadata.labels[TARGET] == "b"])
        == 1
    )
    canary_events = [m for _, r, m in event_reasons(k8s, namespace) if r.startswith("Canary")]
    assert canary_events and all(m.startswith("target a: ") for m in canary_events)
