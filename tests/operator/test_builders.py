"""The operator's pure parts, without a cluster: Job manifest, status
transitions, result verification and queue order."""

from __future__ import annotations

import json

import pytest

from edgeslim import storage
from edgeslim.api.result import EvaluationFigures, GateVerdict, ModelFigures
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import Phase
from edgeslim.api.termination import TerminationMessage
from edgeslim.operator import events, jobs, podspec, queue, results, status
from edgeslim.operator.names import KUEUE_QUEUE_LABEL, MODEL_LABEL, SPEC_HASH_LABEL, job_name
from edgeslim.operator.settings import Settings

UID = "0f0e0d0c-0000-4000-8000-000000000001"


def model(name: str = "digits-cnn", **spec: object) -> CompressedModel:
    body = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": name, "namespace": "vision", "uid": UID, "generation": 3},
        "spec": {
            "source": {"uri": "s3://models/digits/cnn.onnx", "credentialsSecret": "s3-creds"},
            "evaluation": {"dataset": "s3://datasets/digits/val.npz", "maxMetricDrop": 0.02},
            "pipeline": [{"quantize": {"mode": "dynamic"}}],
            "output": {"uri": "s3://models/edge/"},
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
            "activeDeadlineSeconds": 900,
            **spec,
        },
    }
    return CompressedModel.model_validate(body)


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------- Job


def test_job_name_is_deterministic_and_fits_a_label() -> None:
    m = model("a" * 63)
    h = m.spec.spec_hash()
    assert job_name(m.metadata.name, h) == job_name(m.metadata.name, h)
    assert len(job_name(m.metadata.name, h)) <= 63
    assert job_name("ab-" + "c" * 37 + "-xyz", h).count("--") == 0
    assert job_name("x", "0123456789abcdef") == "x-0123456789"


def test_job_is_owned_labelled_and_runs_the_spec() -> None:
    m = model()
    h = m.spec.spec_hash()
    job = jobs.build_job(m, Settings(job_backoff_limit=2, job_ttl_seconds=600), h)
    meta = job["metadata"]
    assert meta["name"] == job_name("digits-cnn", h)
    assert meta["labels"][MODEL_LABEL] == "digits-cnn"
    assert meta["labels"][SPEC_HASH_LABEL] == h
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "name": "digits-cnn",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = job["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 900
    assert "suspend" not in spec
    c = container(job)
    assert c["command"] == ["edgeslim", "compress", "--spec-env", "EDGESLIM_SPEC"]
    env = {e["name"]: e for e in c["env"]}
    handed = json.loads(env["EDGESLIM_SPEC"]["value"])
    assert CompressedModel.model_validate(handed).spec.spec_hash() == h
    assert handed["metadata"] == {"name": "digits-cnn", "namespace": "vision"}
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_job_takes_credentials_from_the_secret_only() -> None:
    job = jobs.build_job(model(), Settings(), model().spec.spec_hash())
    env = {e["name"]: e for e in container(job)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key}
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION"):
        assert env[key]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    no_secret = model(source={"uri": "s3://models/digits/cnn.onnx"})
    env = {e["name"]: e for e in container(jobs.build_job(no_secret, Settings(), "h" * 16))["env"]}
    # No keys of anyone's, and boto3 may not fall back to the node's cloud role.
    assert not {k for k, _ in podspec.SECRET_KEYS} & env.keys()
    assert env["AWS_EC2_METADATA_DISABLED"]["value"] == "true"
    assert [n for n in env if n.startswith("AWS_")] == ["AWS_EC2_METADATA_DISABLED"]


def test_job_pod_is_locked_down() -> None:
    job = jobs.build_job(model(), Settings(), model().spec.spec_hash())
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    sc = container(job)["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container(job)["volumeMounts"]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "16Gi"}}]
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    assert env["TMPDIR"] == "/tmp" and env["HOME"] == "/tmp"


def test_job_fails_at_once_on_bad_input_or_rejection() -> None:
    job = jobs.build_job(model(), Settings(), model().spec.spec_hash())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"] == {
        "containerName": "compressor",
        "operator": "In",
        "values": [2, 3],
    }


def test_kueue_jobs_start_suspended_with_the_queue_label() -> None:
    job = jobs.build_job(model(), Settings(kueue_queue="edge"), model().spec.spec_hash())
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "edge"
    assert job["spec"]["suspend"] is True
    # The spec's own request is what Kueue's quota counts.
    assert container(job)["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    plain = jobs.build_job(model(), Settings(), model().spec.spec_hash())
    assert KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]
    assert "suspend" not in plain["spec"]


def test_kueue_jobs_request_cpu_so_the_quota_counts_them() -> None:
    bare = model(resources=None)
    job = jobs.build_job(bare, Settings(kueue_queue="edge"), bare.spec.spec_hash())
    assert container(job)["resources"] == {"requests": {"cpu": "1"}}
    # Without Kueue nothing is added: the scheduler places it as the spec says.
    assert container(jobs.build_job(bare, Settings(), bare.spec.spec_hash()))["resources"] == {}
    # A CPU limit alone: the request is the limit (what Kubernetes defaults it to),
    # never more than the limit.
    capped = model(resources={"limits": {"cpu": "500m"}})
    job = jobs.build_job(capped, Settings(kueue_queue="edge"), capped.spec.spec_hash())
    assert container(job)["resources"] == {
        "requests": {"cpu": "500m"},
        "limits": {"cpu": "500m"},
    }


def test_job_state() -> None:
    def job(*conds: str, suspend: bool = False) -> dict:
        c = [{"type": t, "status": "True"} for t in conds]
        return {"spec": {"suspend": suspend}, "status": {"conditions": c}}

    assert jobs.job_state(job()) is jobs.JobState.running
    assert jobs.job_state(job(suspend=True)) is jobs.JobState.suspended
    # SuccessCriteriaMet comes before the pods are done: not final yet.
    assert jobs.job_state(job("SuccessCriteriaMet")) is jobs.JobState.running
    assert jobs.job_state(job("SuccessCriteriaMet", "Complete")) is jobs.JobState.succeeded
    assert jobs.job_state(job("FailureTarget", "Failed")) is jobs.JobState.failed


# ------------------------------------------------------------ status


def test_condition_keeps_its_transition_time_until_status_flips() -> None:
    s = status.parse({})
    first = status.parse(
        status.apply(s, 1, status.Transition(Phase.queued, "Queued", "wait"), "T1")
    )
    ready = next(c for c in first.conditions if c.type == "Ready")
    assert (ready.status, ready.last_transition_time, ready.observed_generation) == (
        "Unknown",
        "T1",
        1,
    )
    second = status.parse(
        status.apply(first, 2, status.Transition(Phase.compressing, "Compressing", "go"), "T2")
    )
    ready = next(c for c in second.conditions if c.type == "Ready")
    assert (ready.status, ready.reason, ready.last_transition_time) == (
        "Unknown",
        "Compressing",
        "T1",
    )
    assert ready.observed_generation == 2 and second.observed_generation == 2
    third = status.parse(
        status.apply(second, 2, status.Transition(Phase.failed, "Boom", "x"), "T3")
    )
    ready = next(c for c in third.conditions if c.type == "Ready")
    assert (ready.status, ready.last_transition_time) == ("False", "T3")
    assert [c.type for c in third.conditions] == [
        "Ready",
        "Compressed",
        "GatePassed",
        "Reconciling",
        "Stalled",
    ]


def _conds(raw: dict) -> dict[str, tuple[str, str, int | None]]:
    return {
        c.type: (c.status, c.reason, c.observed_generation) for c in status.parse(raw).conditions
    }


@pytest.mark.parametrize("phase", [Phase.pending, Phase.queued, Phase.compressing])
def test_work_in_progress_is_reconciling_and_not_stalled(phase: Phase) -> None:
    raw = status.apply(status.parse({}), 4, status.Transition(phase, phase.value, "busy"), "T1")
    c = _conds(raw)
    assert c["Reconciling"] == ("True", phase.value, 4)
    assert c["Stalled"] == ("False", phase.value, 4)
    assert next(x for x in status.parse(raw).conditions if x.type == "Reconciling").message


@pytest.mark.parametrize(
    ("phase", "reason"),
    [(Phase.rejected, "GateRejected"), (Phase.failed, "CompressionFailed")],
)
def test_rejected_and_failed_are_stalled_with_the_reason(phase: Phase, reason: str) -> None:
    cur = status.parse(
        status.apply(status.parse({}), 2, status.Transition(Phase.compressing, "C", "x"), "T1")
    )
    raw = status.apply(cur, 2, status.Transition(phase, reason, "drop 0.2 > 0.01"), "T2")
    c = _conds(raw)
    assert c["Stalled"] == ("True", reason, 2)
    assert c["Reconciling"] == ("False", phase.value, 2)
    stalled = next(x for x in status.parse(raw).conditions if x.type == "Stalled")
    assert (stalled.message, stalled.last_transition_time) == ("drop 0.2 > 0.01", "T2")


def test_ready_is_neither_reconciling_nor_stalled_and_every_condition_has_the_generation() -> None:
    cur = status.parse(
        status.apply(status.parse({}), 5, status.Transition(Phase.failed, "Boom", "x"), "T1")
    )
    raw = status.apply(cur, 6, status.Transition(Phase.ready, "GatePassed", "ok"), "T2")
    c = _conds(raw)
    assert c["Ready"][0] == "True"
    assert c["Reconciling"][0] == c["Stalled"][0] == "False"
    assert {g for _, _, g in c.values()} == {6}
    # A spec change that keeps the artifact moves every condition to the new generation.
    touched = status.touch_generation(status.parse(raw), 7)
    assert {g for _, _, g in _conds(touched).values()} == {7}


def test_merge_patch_removes_what_went() -> None:
    old = {"phase": "Ready", "results": {"a": 1}, "artifact": {"uri": "x"}}
    new = {"phase": "Compressing", "results": {"a": 1}}
    assert status.merge_patch(old, new) == {"phase": "Compressing", "artifact": None}
    assert status.merge_patch(new, new) == {}


def test_one_event_per_phase_change() -> None:
    assert events.for_transition(Phase.queued, Phase.queued, "Queued", "") is None
    kind, reason, _ = events.for_transition(Phase.compressing, Phase.rejected, "GateRejected", "x")
    assert (kind, reason) == ("Warning", "GateRejected")
    assert events.for_transition(None, Phase.compressing, "Compressing", "y")[0] == "Normal"


# ----------------------------------------------------------- results


def message(m: CompressedModel, **over: object) -> TerminationMessage:
    """The termination message the compressor writes for `m` (fields replaced by `over`)."""
    h = m.spec.spec_hash()
    prefix = storage.result_prefix("s3://models/edge/", m.metadata.namespace, m.metadata.name, h)
    return TerminationMessage(
        name=m.metadata.name,
        namespace=m.metadata.namespace,
        spec_hash=h,
        artifact=ModelFigures(
            uri=storage.join(prefix, "model.onnx"), sha256="a" * 64, size_bytes=10
        ),
        compression_ratio=3.9,
        download_ratio=4.2,
        evaluation=EvaluationFigures(
            metric="accuracy", samples=9, baseline=0.9, compressed=0.89, drop=0.01
        ),
        gate=GateVerdict(passed=True, max_metric_drop=0.02, reason="ok"),
        manifest_uri=storage.join(prefix, "manifest.json"),
    ).model_copy(update=over)


def summary(m: CompressedModel, **over: object) -> str:
    return message(m, **over).text()


def ref(m: CompressedModel, spec_hash: str | None = None) -> jobs.JobRef:
    h = spec_hash or m.spec.spec_hash()
    return jobs.JobRef("vision", job_name(m.metadata.name, h), "job-uid", m.metadata.name, h, UID)


def term(code: int, message: str) -> jobs.Termination:
    return jobs.Termination("pod-1", code, message, "2026-01-01T00:00:00Z")


def test_a_verified_result_makes_the_model_ready() -> None:
    m = model()
    out = results.outcome(jobs.JobState.succeeded, "", [term(0, summary(m))], ref(m), m)
    assert out.phase is Phase.ready
    assert results.results_status(out.result).download_ratio == 4.2
    assert results.artifact_status(out.result).sha256 == "a" * 64


@pytest.mark.parametrize(
    "over",
    [
        {"spec_hash": "ffffffffffffffff"},
        {"name": "someone-else"},
        {"namespace": "other-team"},
        {"manifest_uri": "s3://elsewhere/digits-cnn/x/manifest.json"},
    ],
)
def test_a_result_that_is_not_this_jobs_is_refused(over: dict) -> None:
    m = model()
    out = results.outcome(jobs.JobState.succeeded, "", [term(0, summary(m, **over))], ref(m), m)
    assert (out.phase, out.reason) == (Phase.failed, "UntrustedResult")


def test_a_job_owned_by_another_object_is_refused() -> None:
    m = model()
    other = jobs.JobRef("vision", "j", "u", m.metadata.name, m.spec.spec_hash(), "other-uid")
    out = results.outcome(jobs.JobState.succeeded, "", [term(0, summary(m))], other, m)
    assert out.reason == "UntrustedResult"


def test_exit_codes_decide_rejected_and_invalid_spec() -> None:
    m = model()
    gate = GateVerdict(passed=False, max_metric_drop=0.02, reason="drop too big")
    rejected = results.outcome(
        jobs.JobState.failed, "PodFailurePolicy", [term(3, summary(m, gate=gate))], ref(m), m
    )
    assert (rejected.phase, rejected.reason) == (Phase.rejected, "GateRejected")
    assert rejected.result is not None and rejected.metric_result == "rejected"
    log = "step 1/1\nedgeslim: error: evaluation.dataset s3://x/y.npz: not found\n"
    bad = results.outcome(jobs.JobState.failed, "PodFailurePolicy", [term(2, log)], ref(m), m)
    assert (bad.phase, bad.reason) == (Phase.failed, "InvalidSpec")
    assert bad.message == "evaluation.dataset s3://x/y.npz: not found"
    crash = results.outcome(
        jobs.JobState.failed, "BackoffLimitExceeded", [term(1, "Traceback...\nOOM")], ref(m), m
    )
    assert crash.reason == "CompressionFailed" and "OOM" in crash.message


def test_pods_of_another_job_are_ignored() -> None:
    pod = {
        "metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "uid": "other"}]},
        "status": {
            "containerStatuses": [
                {"name": "compressor", "state": {"terminated": {"exitCode": 0, "message": "{}"}}}
            ]
        },
    }
    assert jobs.terminations([pod], "mine") == []
    assert len(jobs.terminations([pod], "other")) == 1


# -------------------------------------------------------------- queue


def test_queue_is_first_come_first_served() -> None:
    a = queue.Waiting("2026-01-01T00:00:02Z", "ns", "a")
    b = queue.Waiting("2026-01-01T00:00:01Z", "ns", "b")
    c = queue.Waiting("2026-01-01T00:00:01Z", "ns", "a2")
    assert queue.order([a, b, c]) == [c, b, a]  # time, then name
    assert queue.admissible([a, b, c], running=1, limit=2) == [c]
    assert queue.admissible([a, b, c], running=2, limit=2) == []
    assert queue.admissible([a, b, c], running=5, limit=0) == [c, b, a]
    assert queue.position([a, b, c], ("ns", "a")) == 3


def test_slots_never_promise_more_than_the_limit() -> None:
    slots = queue.Slots(limit=2)
    waiting = [queue.Waiting(f"2026-01-01T00:00:0{i}Z", "ns", f"m{i}", f"j{i}") for i in range(5)]
    for w in waiting:
        slots.wait(w)
    first = slots.take([], running={})
    assert [w.name for w in first] == ["m0", "m1"]
    assert slots.take([], running={}) == []  # reservations count until the index shows them
    # The index now shows both Jobs running: still full.
    running = {("ns", "m0"): {"j0"}, ("ns", "m1"): {"j1"}}
    assert slots.take([], running=running) == []
    # m0's Job finished: the next in line gets its slot.
    assert [w.name for w in slots.take([], running={("ns", "m1"): {"j1"}})] == ["m2"]
