"""The canary's pure parts: the decision, the replica split, the measurement from
real /metrics texts of the serving metrics, and the manifests."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeslim.api.canary import CanarySpec, Verdict
from edgeslim.api.status import CompressedModelStatus, Condition, FailedArtifact, ServedArtifact
from edgeslim.operator import canary, serving
from edgeslim.operator.canary import Measurement, decide, measure, split
from edgeslim.operator.names import APPLIED_HASH_ANNOTATION
from edgeslim.operator.settings import Settings
from edgeslim.serving.metrics import ServingMetrics
from edgeslim.serving.shadow import Shadow
from tests.operator.test_builders import model

SPEC = CanarySpec(
    steps=[10, 50, 100],
    interval_seconds=30,
    max_error_rate=0.01,
    max_p95_ms=50,
    min_agreement=0.95,
    min_samples=20,
)
GOOD = Measurement(requests=200, errors=0, p95_ms=3.0, samples=40, agreement_sum=40.0)


def test_a_healthy_step_advances_after_its_interval_and_the_last_promotes() -> None:
    d = decide(SPEC, 0, GOOD, elapsed=31)
    assert d.verdict is Verdict.advance
    assert "advancing to 50%" in d.reason and "agreement 1.000 over 40" in d.reason
    assert decide(SPEC, 1, GOOD, elapsed=31).verdict is Verdict.promote


def test_holds_until_the_interval_passed_and_enough_samples_came() -> None:
    d = decide(SPEC, 0, GOOD, elapsed=10)
    assert (d.verdict, d.reason) == (Verdict.hold, "step 10% runs 20 s more")
    few = Measurement(requests=200, samples=5, agreement_sum=5.0, p95_ms=3.0)
    d = decide(SPEC, 0, few, elapsed=60)
    assert d.verdict is Verdict.hold and "5 shadow comparisons" in d.reason
    # A breach seen on too few samples is not judged yet either.
    bad_few = Measurement(requests=10, errors=5, samples=3, agreement_sum=0.0)
    assert decide(SPEC, 0, bad_few, elapsed=60).verdict is Verdict.hold


@pytest.mark.parametrize(
    ("m", "words"),
    [
        (
            Measurement(requests=200, samples=40, agreement_sum=4.0, p95_ms=3.0),
            "agreement with the stable artifact 0.100 < minAgreement 0.95 "
            "over 40 shadow comparisons",
        ),
        (
            Measurement(requests=200, errors=5, samples=40, agreement_sum=40.0, p95_ms=3.0),
            "error rate 0.0250 > maxErrorRate 0.01 (5 of 200 requests)",
        ),
        (
            Measurement(requests=200, samples=40, agreement_sum=40.0, p95_ms=80.0),
            "p95 latency 80.0 ms > maxP95Ms 50 over 200 requests",
        ),
    ],
)
def test_each_threshold_rolls_back_at_once(m: Measurement, words: str) -> None:
    d = decide(SPEC, 1, m, elapsed=1)  # before the interval is up: a breach does not wait
    assert d.verdict is Verdict.rollback
    assert d.reason == words


def test_split_keeps_one_of_each_below_100() -> None:
    assert split(10, 10) == (9, 1)
    assert split(10, 50) == (5, 5)
    assert split(2, 10) == (1, 1)
    assert split(1, 50) == (1, 1)  # one extra pod while the canary runs
    assert split(4, 100) == (0, 4)


def test_spec_steps_must_increase_to_100() -> None:
    for steps in ([50, 10, 100], [10, 50], [0, 100], [10, 10, 100]):
        with pytest.raises(ValidationError):
            CanarySpec(steps=steps)
    assert CanarySpec().steps == [10, 50, 100]


def test_measure_reads_real_serving_metrics() -> None:
    texts = []
    for errors, agree in ((0, 1.0), (2, 0.0)):
        m = ServingMetrics()
        shadow = Shadow([("127.0.0.1", 9)], "digits", 1.0, m.registry)
        for _ in range(50):
            m.count("infer", 200)
            m.request_duration.observe(0.004)
            shadow.agreement_sum.inc(agree)
            shadow.requests.labels("compared").inc()
        for _ in range(errors):
            m.count("infer", 500)
            m.request_duration.observe(0.2)
        m.count("metrics", 200)  # not an inference request
        shadow.close()
        texts.append(m.exposition()[0].decode())
    got = measure(texts)
    assert (got.requests, got.errors, got.samples, got.pods) == (102, 2, 100, 2)
    assert got.agreement == pytest.approx(0.5)
    assert got.error_rate == pytest.approx(2 / 102)
    assert got.p95_ms is not None and 2.5 < got.p95_ms <= 5.0  # within the 2.5-5 ms bucket


def test_quantile_interpolates_like_histogram_quantile() -> None:
    assert canary.quantile({0.1: 50, 0.2: 100, float("inf"): 100}, 0.95) == pytest.approx(0.19)
    assert canary.quantile({0.1: 0, float("inf"): 0}, 0.95) is None
    assert canary.quantile({0.1: 10, float("inf"): 100}, 0.95) == 0.1


def test_canary_deployment_shares_the_service_selector_and_compares_in_shadow() -> None:
    m = model(deployment={"replicas": 4, "canary": {"shadowSampleRate": 0.25}})
    art = ServedArtifact(uri="s3://models/edge/x/model.onnx", sha256="b" * 64)
    dep = canary.build_canary_deployment(m, art, 2, "http://10.0.0.7:8080", Settings())
    assert dep["metadata"]["name"] == "digits-cnn-canary"
    assert dep["spec"]["replicas"] == 2
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    service = serving.build_service(m)
    # The Service selects canary pods too; only the canary's selector has the track.
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"][canary.TRACK_LABEL] == "canary"
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-4:] == [
        "--shadow-url",
        "http://10.0.0.7:8080",
        "--shadow-sample-rate",
        "0.25",
    ]
    assert canary.shadow_url_of(dep) == "http://10.0.0.7:8080"
    stable = canary.scaled(serving.build_deployment(m, art, Settings()), 2)
    full = serving.build_deployment(m, art, Settings())
    assert stable["spec"]["replicas"] == 2
    assert (
        stable["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
        != full["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    )


def test_stable_urls_are_the_ready_stable_pods() -> None:
    def pod(ip: str, sha: str, ready: bool = True, track: str | None = None) -> dict:
        labels = {canary.TRACK_LABEL: track} if track else {}
        return {
            "metadata": {"labels": labels, "annotations": {serving.ARTIFACT_SHA_ANNOTATION: sha}},
            "status": {
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }

    pods = [
        pod("10.0.0.2", "a"),
        pod("10.0.0.1", "a"),
        pod("10.0.0.3", "a", ready=False),
        pod("10.0.0.4", "b", track="canary"),
        pod("10.0.0.5", "c"),
    ]
    assert canary.stable_urls(pods, "a") == "http://10.0.0.1:8080,http://10.0.0.2:8080"


def test_a_canary_rollback_names_the_analysis_in_the_rolled_back_status() -> None:
    good = ServedArtifact(uri="s3://b/old/model.onnx", sha256="a" * 64)
    cand = "c" * 64
    st = CompressedModelStatus.model_validate(
        {
            "phase": "Deploying",
            "specHash": "h1",
            "artifact": {"uri": "s3://b/new/model.onnx", "sha256": cand, "sizeBytes": 1},
            "conditions": [
                Condition(
                    type="GatePassed", status="True", reason="GatePassed", lastTransitionTime="t"
                ).wire()
            ],
            "lastGoodArtifact": good.wire(),
            "failedArtifacts": [
                FailedArtifact(
                    sha256=cand,
                    spec_hash="h1",
                    reason=serving.CANARY_REASON,
                    message="agreement 0.000 < minAgreement 0.95",
                ).wire()
            ],
        }
    )
    dep = serving.build_deployment(
        model(deployment={"replicas": 2}), good, Settings()
    )  # the stable Deployment, scaling back to all replicas: it never stopped serving
    dep["metadata"]["generation"] = 1
    dep["status"] = {
        "observedGeneration": 1,
        "replicas": 2,
        "updatedReplicas": 2,
        "availableReplicas": 1,
        "readyReplicas": 1,
    }
    p = serving.plan(st, "h1", serving.rollout_state(dep))
    assert p.target == good
    assert p.reason == "RolledBack"
    assert "was rolled back (CanaryAnalysis: agreement 0.000 < minAgreement 0.95)" in p.message
