"""Metric-gated canary on the real control plane: the operator as a process, the node
agent running real `edgeslim serve` pods (each on its own loopback pod IP), S3 (moto).

Artifacts come from a node-agent hook standing in for the compressor (see
test_rollout): the digits model, the same model under other bytes (agrees), and
the model with its output classes permuted (loads, answers fast, names the wrong
digit). A client thread sends digits to every serving pod, as the Service would,
all through; the canary pods compare their answers with the stable pods' in
shadow, and the operator reads the canary pods' /metrics.

1. the agreeing artifact goes 25% -> 50% -> promoted, step by step;
2. the permuted one is rolled back at its first step with the agreement in the
   reason, and the stable artifact answered right all along.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tests.canary_models import permuted_classes, same_answers
from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.operator.support import (
    artifact_result_hook,
    condition,
    create_model,
    digits_in_s3,
    get_model,
    infer_digit,
    kubectl,
    model_body,
    patch_spec,
    pod_ready,
    wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TIMEOUT = 180
SHA = "edgeslim.io/artifact-sha256"
SERVING = "edgeslim.io/model=digits,app.kubernetes.io/component=serving"
CANARY = {
    "steps": [25, 50, 100],
    "intervalSeconds": 3,
    "minSamples": 15,
    "minAgreement": 0.9,
    "maxErrorRate": 0.05,
    "shadowSampleRate": 1.0,
}


class Traffic:
    """Sends one digit to every ready serving pod, round after round, and records
    which artifacts answered each round and whether they named the digit right."""

    def __init__(self, k8s: K8s, namespace: str, samples: list[tuple[np.ndarray, int]]) -> None:
        self.k8s, self.namespace, self.samples = k8s, namespace, samples
        # Per round: artifact sha -> (answered, named the digit right) of each request.
        self.rounds: list[dict[str, list[tuple[bool, bool]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def mark(self) -> int:
        return len(self.rounds)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            pods = self.k8s.core.list_namespaced_pod(self.namespace, label_selector=SERVING).items
            answered: dict[str, list[tuple[bool, bool]]] = {}
            for pod in pods:
                if pod.metadata.deletion_timestamp or not pod_ready(pod) or not pod.status.pod_ip:
                    continue
                x, y = self.samples[i % len(self.samples)]
                i += 1
                sha = pod.metadata.annotations.get(SHA, "")
                try:
                    answered.setdefault(sha, []).append(
                        (True, infer_digit(pod.status.pod_ip, x) == y)
                    )
                except OSError:
                    answered.setdefault(sha, []).append((False, False))
            self.rounds.append(answered)
            self._stop.wait(0.05)


def event_reasons(k8s: K8s, namespace: str) -> list[tuple[str, str, str]]:
    items = k8s.core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=digits"
    ).items
    return [(e.type, e.reason, e.message) for e in items]


def test_canary_promotes_an_agreeing_artifact_and_rolls_back_a_permuted_one(
    k8s: K8s, namespace: str, run_operator, s3_server, s3: str, digits, node_agent: NodeAgent
) -> None:
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()
    val = np.load(digits.val)
    samples = [(val["x"][i : i + 1], int(val["y"][i])) for i in range(40)]
    model = digits.model()
    v1, v2, v3 = model.SerializeToString(), same_answers(model), permuted_classes(model)

    body = model_body("digits", s3)
    body["spec"]["deployment"] = {
        "replicas": 2,
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "progressDeadlineSeconds": 60,
        "canary": CANARY,
    }
    with node_agent.hooked(artifact_result_hook(s3_server, v1)):
        create_model(k8s, namespace, body)
        first = wait_phase(k8s, namespace, "digits", {"Ready"}, TIMEOUT, op)
    sha1 = first["status"]["servingArtifact"]
    assert "canary" not in first["status"]  # nothing to compare the first artifact with

    with Traffic(k8s, namespace, samples) as traffic:
        # 1. An artifact that answers like the stable one: promoted step by step.
        with node_agent.hooked(artifact_result_hook(s3_server, same_answers(model))):
            generation = patch_spec(k8s, namespace, {"evaluation": {"maxMetricDrop": 0.06}})

            def at_step(weight: int) -> dict | None:
                st = get_model(k8s, namespace, "digits").get("status") or {}
                c = st.get("canary") or {}
                return st if c.get("weight") == weight and c.get("result") == "Running" else None

            st = wait_until(lambda: at_step(25), TIMEOUT, 0.3, "the canary at 25%")
            sha2 = st["canary"]["artifact"]
            assert st["canary"]["stable"] == sha1 and sha2 != sha1
            assert st["phase"] == "Deploying" and st["servingArtifact"] == sha1
            print(kubectl(k8s, namespace, "get", "compressedmodel", "digits"))
            wait_until(lambda: at_step(50), TIMEOUT, 0.3, "the canary at 50%")
            print(kubectl(k8s, namespace, "get", "compressedmodel", "digits"))
            print(kubectl(k8s, namespace, "get", "deploy,pods", "-o", "wide"))
            second = wait_phase(
                k8s, namespace, "digits", {"Ready"}, TIMEOUT, op, generation=generation
            )
        st = second["status"]
        assert st["servingArtifact"] == sha2 == st["lastGoodArtifact"]["sha256"]
        c = st["canary"]
        assert c["result"] == "Promoted" and "shown" not in c
        decided = [(a["weight"], a["verdict"]) for a in c["analyses"] if a["verdict"] != "Hold"]
        assert decided == [(25, "Advance"), (50, "Promote")]
        last = c["analyses"][-1]
        assert last["agreement"] == 1.0 and last["samples"] >= 15 and last["errorRate"] == 0.0
        assert last["p95Ms"] > 0
        wait_until(
            lambda: (
                not k8s.apps.list_namespaced_deployment(
                    namespace, label_selector="edgeslim.io/track=canary"
                ).items
            ),
            60,
            0.5,
            "the canary Deployment to go after the promotion",
        )
        reasons = [r for _, r, _ in event_reasons(k8s, namespace)]
        assert {"CanaryStarted", "CanaryAdvanced", "CanaryPromoted"} <= set(reasons)
        print(json.dumps(c, indent=2))

        # 2. An artifact whose classes are permuted: rolled back at its first step.
        mark = traffic.mark()
        with node_agent.hooked(artifact_result_hook(s3_server, v3)):
            generation = patch_spec(k8s, namespace, {"evaluation": {"maxMetricDrop": 0.07}})
            failed = wait_phase(
                k8s, namespace, "digits", {"Failed"}, TIMEOUT, op, generation=generation
            )
        st = failed["status"]
        sha3 = st["artifact"]["sha256"]
        assert st["servingArtifact"] == sha2
        entry = st["failedArtifacts"][-1]
        assert (entry["sha256"], entry["reason"]) == (sha3, "CanaryAnalysis")
        assert entry["message"].startswith("agreement with the stable artifact 0.")
        assert "< minAgreement 0.9" in entry["message"]
        assert condition(failed, "Ready")["reason"] == "RolledBack"
        assert "CanaryAnalysis: agreement" in st["message"]
        c = st["canary"]
        assert c["artifact"] == sha3 and c["result"] == "RolledBack"
        assert c["analyses"][-1]["verdict"] == "RollBack" and c["analyses"][-1]["weight"] == 25
        assert c["analyses"][-1]["agreement"] < 0.9
        warnings = [(t, r) for t, r, _ in event_reasons(k8s, namespace)]
        assert ("Warning", "CanaryRolledBack") in warnings

        def back_on_stable() -> bool:
            deps = k8s.apps.list_namespaced_deployment(namespace).items
            pods = k8s.core.list_namespaced_pod(namespace, label_selector=SERVING).items
            live = [p for p in pods if not p.metadata.deletion_timestamp]
            return (
                [d.metadata.name for d in deps] == ["digits"]
                and deps[0].spec.replicas == 2
                and len(live) == 2
                and all(p.metadata.annotations[SHA] == sha2 for p in live)
            )

        wait_until(back_on_stable, 60, 0.5, "the canary gone, the stable Deployment at 2")
        print(kubectl(k8s, namespace, "get", "compressedmodel", "digits"))
        print(json.dumps({"canary": c, "failedArtifacts": st["failedArtifacts"]}, indent=2))
        columns = "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message"
        print(kubectl(k8s, namespace, "get", "events", "--sort-by=.metadata.creationTimestamp",
                      "--field-selector=involvedObject.name=digits", "-o", columns))  # fmt: skip
        rounds = traffic.rounds[mark:]

    # The stable artifact answered, and answered right, in every round of the rollback
    # phase; the permuted canary did answer clients meanwhile (wrongly).
    assert rounds and all(any(ok for ok, _ in r.get(sha2, [])) for r in rounds)
    stable_right = [right for r in rounds for _, right in r.get(sha2, [])]
    assert sum(stable_right) >= 0.9 * len(stable_right)
    canary_right = [right for r in rounds for ok, right in r.get(sha3, []) if ok]
    assert canary_right and sum(canary_right) <= 0.2 * len(canary_right)
    assert v1 != v2
