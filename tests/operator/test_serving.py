"""Edge serving without a cluster: the Deployment and Service builders, the
rollout reader and the decision what to roll out (and when to roll back)."""

from __future__ import annotations

from typing import Any

import pytest

from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, FailedArtifact, Phase, ServedArtifact
from edgeslim.operator import serving, status
from edgeslim.operator.names import (
    APPLIED_HASH_ANNOTATION,
    ARTIFACT_SHA_ANNOTATION,
    ARTIFACT_URI_ANNOTATION,
    MODEL_LABEL,
    serving_name,
)
from edgeslim.operator.serving import Rollout, RolloutState
from edgeslim.operator.settings import Settings

UID = "0f0e0d0c-0000-4000-8000-000000000001"
GOOD = ServedArtifact(uri="s3://models/edge/digits/aaaa/model.onnx", sha256="a" * 64)
NEW = ServedArtifact(uri="s3://models/edge/digits/bbbb/model.onnx", sha256="b" * 64)
HASH = "bbbbbbbbbbbbbbbb"
Obj = dict[str, Any]


def model(**deployment: object) -> CompressedModel:
    return CompressedModel.model_validate(
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": "digits", "namespace": "vision", "uid": UID, "generation": 2},
            "spec": {
                "source": {"uri": "s3://models/digits/cnn.onnx", "credentialsSecret": "s3-creds"},
                "evaluation": {"dataset": "s3://models/digits/val.npz"},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
                "output": {"uri": "s3://models/edge/"},
                "deployment": {
                    "replicas": 3,
                    "nodeSelector": {"node-role.kubernetes.io/edge": ""},
                    "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
                    "resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "256Mi"}},
                    "progressDeadlineSeconds": 120,
                    "threads": 2,
                    **deployment,
                },
            },
        }
    )


def pod_spec(d: Obj) -> Obj:
    return d["spec"]["template"]["spec"]


# ----------------------------------------------------------------- builders


def test_serving_entrypoint_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESLIM_SERVING_COMMAND", "/opt/venv/bin/python -m edgeslim.cli")
    d = serving.build_deployment(model(), NEW, Settings.from_env())
    [c] = pod_spec(d)["containers"]
    assert c["command"][:5] == ["/opt/venv/bin/python", "-m", "edgeslim.cli", "serve", "--model"]


def test_deployment_runs_the_artifact_on_its_own_pod_ip() -> None:
    d = serving.build_deployment(model(), NEW, Settings(serving_image="serve:1"))
    [c] = pod_spec(d)["containers"]
    assert c["image"] == "serve:1"
    assert c["command"] == [
        "edgeslim", "serve", "--model", NEW.uri, "--sha256", NEW.sha256, "--name", "digits",
        "--port", "8080", "--health-port", "8081", "--host", "$(POD_IP)", "--threads", "2",
    ]  # fmt: skip
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # S3 credentials by reference, from the Secret the compressor Job uses.
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")
    assert all("value" not in env[k] for k in keys)
    template_ann = d["spec"]["template"]["metadata"]["annotations"]
    assert template_ann[ARTIFACT_SHA_ANNOTATION] == NEW.sha256
    assert template_ann[ARTIFACT_URI_ANNOTATION] == NEW.uri


def test_deployment_probes_rollout_strategy_and_security() -> None:
    d = serving.build_deployment(model(), NEW, Settings())
    [c] = pod_spec(d)["containers"]
    assert c["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "health", "containerPort": 8081, "protocol": "TCP"},
    ]
    # Probes go to the probe listener, which a flood on 8080 cannot crowd out.
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "health"}
    spec = d["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert spec["progressDeadlineSeconds"] == 120
    assert spec["replicas"] == 3
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    # The artifact plus a staged copy of it, at the default 4 GiB download limit.
    assert pod_spec(d)["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}}]
    assert pod_spec(d)["automountServiceAccountToken"] is False


def test_deployment_placement_resources_owner_and_labels() -> None:
    d = serving.build_deployment(model(), NEW, Settings())
    ps = pod_spec(d)
    assert ps["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
    assert ps["tolerations"] == [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    assert ps["containers"][0]["resources"] == {
        "requests": {"cpu": "250m"},
        "limits": {"memory": "256Mi"},
    }
    meta = d["metadata"]
    assert meta["name"] == "digits" and meta["namespace"] == "vision"
    assert meta["labels"][MODEL_LABEL] == "digits"
    assert d["spec"]["template"]["metadata"]["labels"][MODEL_LABEL] == "digits"
    assert d["spec"]["selector"]["matchLabels"][MODEL_LABEL] == "digits"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "name": "digits",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_applied_hash_changes_with_the_artifact_and_the_spec_only() -> None:
    def h(m: CompressedModel, a: ServedArtifact) -> str:
        return serving.build_deployment(m, a, Settings())["metadata"]["annotations"][
            APPLIED_HASH_ANNOTATION
        ]

    assert h(model(), NEW) == h(model(), NEW)
    assert h(model(), NEW) != h(model(), GOOD)
    assert h(model(), NEW) != h(model(replicas=4), NEW)


def test_service_selects_the_serving_pods_on_8080() -> None:
    m = model()
    svc = serving.build_service(m)
    d = serving.build_deployment(m, NEW, Settings())
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == UID


def test_serving_names_are_dns_1035_labels() -> None:
    assert serving_name("digits") == "digits"
    assert serving_name("3d-model") == "m-3d-model"
    assert len(serving_name("a" * 63)) == 63


# ------------------------------------------------------------ rollout reader


def deployment(
    artifact: ServedArtifact = NEW,
    *,
    replicas: int = 2,
    generation: int = 3,
    observed: int = 3,
    updated: int = 2,
    ready: int = 2,
    total: int = 2,
    progressing: tuple[str, str] = ("True", "NewReplicaSetAvailable"),
) -> Obj:
    return {
        "metadata": {
            "generation": generation,
            "ownerReferences": [{"uid": UID, "controller": True}],
        },
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {
                    "annotations": {
                        ARTIFACT_SHA_ANNOTATION: artifact.sha256,
                        ARTIFACT_URI_ANNOTATION: artifact.uri,
                    }
                }
            },
        },
        "status": {
            "observedGeneration": observed,
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": [
                {"type": "Progressing", "status": progressing[0], "reason": progressing[1]}
            ],
        },
    }


def test_rollout_reader() -> None:
    assert serving.rollout_state(None).rollout is Rollout.absent
    done = serving.rollout_state(deployment())
    assert (done.rollout, done.artifact, done.ready_replicas) == (Rollout.complete, NEW, 2)
    assert done.owner_uid == UID
    # Old pods still around (maxSurge): not complete yet.
    surge = serving.rollout_state(deployment(updated=1, ready=2, total=3))
    assert surge.rollout is Rollout.progressing
    # The controller has not seen the latest template: nothing it says counts yet.
    stale = serving.rollout_state(
        deployment(observed=2, progressing=("False", "ProgressDeadlineExceeded"))
    )
    assert stale.rollout is Rollout.progressing
    failed = serving.rollout_state(
        deployment(updated=1, total=3, progressing=("False", "ProgressDeadlineExceeded"))
    )
    assert failed.rollout is Rollout.failed


# ------------------------------------------------------------------ decision


def passed(
    artifact: ServedArtifact = NEW,
    phase: Phase = Phase.deploying,
    *,
    last_good: ServedArtifact | None = GOOD,
    failed: list[FailedArtifact] | None = None,
    gate: str = "True",
) -> CompressedModelStatus:
    """Status of a model whose current spec (HASH) produced `artifact`."""
    raw = {
        "phase": phase.value,
        "specHash": HASH,
        "artifact": {"uri": artifact.uri, "sha256": artifact.sha256, "sizeBytes": 1},
        "conditions": [
            {
                "type": "GatePassed",
                "status": gate,
                "reason": "WithinMaxMetricDrop",
                "lastTransitionTime": "2024-01-01T00:00:00Z",
            }
        ],
        "failedArtifacts": [f.wire() for f in failed or []],
    }
    if last_good:
        raw["lastGoodArtifact"] = last_good.wire()
    return status.parse(raw)


def state(rollout: Rollout, artifact: ServedArtifact | None = NEW, ready: int = 2) -> RolloutState:
    return RolloutState(rollout, artifact, replicas=2, ready_replicas=ready, updated_replicas=1)


def test_first_rollout_creates_then_completes() -> None:
    p = serving.plan(passed(last_good=None), HASH, state(Rollout.absent, None, 0))
    assert p.target == NEW and p.phase is Phase.deploying and p.available == "False"
    assert p.serving is None
    p = serving.plan(passed(last_good=None), HASH, state(Rollout.complete))
    assert (p.target, p.phase, p.available, p.reason) == (
        NEW,
        Phase.ready,
        "True",
        "RolloutComplete",
    )
    assert p.last_good == NEW and p.serving == NEW.sha256 and p.ready_replicas == 2


def test_a_new_artifact_rolls_out_while_the_old_one_serves() -> None:
    p = serving.plan(passed(), HASH, state(Rollout.complete, GOOD))
    assert p.target == NEW and p.phase is Phase.deploying and p.reason == "RollingOut"
    assert p.serving == GOOD.sha256 and p.last_good == GOOD


def test_progress_deadline_exceeded_rolls_back_to_the_last_good() -> None:
    p = serving.plan(passed(), HASH, state(Rollout.failed, NEW, ready=2))
    assert p.target == GOOD
    assert [(f.sha256, f.spec_hash) for f in p.failed] == [(NEW.sha256, HASH)]
    assert p.phase is Phase.deploying and p.reason == "RollingBack" and p.available == "False"
    assert p.event is not None and p.event[:2] == ("Warning", "ProgressDeadlineExceeded")
    # Once the Deployment is back on the last good artifact: Failed / RolledBack.
    after = passed(failed=list(p.failed))
    back = serving.plan(after, HASH, state(Rollout.complete, GOOD))
    assert (back.target, back.phase, back.reason) == (GOOD, Phase.failed, "RolledBack")
    assert back.serving == GOOD.sha256 and back.event is None
    new = status.parse(serving.apply_plan(after, 4, back, "2024-01-02T00:00:00Z"))
    available = next(c for c in new.conditions if c.type == "Available")
    assert (available.status, available.reason) == ("False", "RolledBack")
    assert new.serving_artifact == GOOD.sha256 and new.last_good_artifact == GOOD
    assert new.observed_generation == 4


def test_a_failed_artifact_is_not_rolled_out_again_for_the_same_spec_hash() -> None:
    failed = [FailedArtifact(sha256=NEW.sha256, spec_hash=HASH, reason="ProgressDeadlineExceeded")]
    for rollout in (Rollout.complete, Rollout.absent, Rollout.progressing):
        p = serving.plan(passed(failed=failed), HASH, state(rollout, GOOD))
        assert p.target == GOOD, rollout
        assert p.event is None
    # The same bytes from another spec hash may try again.
    other = passed(failed=[failed[0].model_copy(update={"spec_hash": "c" * 16})])
    assert serving.plan(other, HASH, state(Rollout.complete, GOOD)).target == NEW


def test_rollout_failure_without_a_last_good_keeps_the_pods_for_debugging() -> None:
    p = serving.plan(passed(last_good=None), HASH, state(Rollout.failed, NEW, ready=0))
    assert (p.target, p.phase, p.reason) == (NEW, Phase.failed, "RolloutFailed")
    assert p.event is not None and p.serving is None


def test_a_rejected_artifact_is_never_deployed() -> None:
    rejected = passed(phase=Phase.rejected, gate="False")
    assert serving.plan(rejected, HASH, state(Rollout.complete, GOOD)).target == GOOD
    assert serving.plan(rejected, HASH, state(Rollout.complete, GOOD)).phase is None
    assert serving.plan(passed(last_good=None, phase=Phase.rejected, gate="False"), HASH,
                        state(Rollout.absent, None)).target is None  # fmt: skip


@pytest.mark.parametrize("phase", [Phase.compressing, Phase.queued])
def test_while_compressing_the_deployment_keeps_its_artifact(phase: Phase) -> None:
    cur = passed(phase=phase)
    p = serving.plan(cur, HASH, state(Rollout.complete, GOOD))
    assert p.target == GOOD and p.phase is None and p.serving == GOOD.sha256
    # A spec change (another hash): the old artifact is no candidate.
    assert serving.plan(passed(), "f" * 16, state(Rollout.complete, GOOD)).target == GOOD


def test_failed_list_is_bounded() -> None:
    many = [
        FailedArtifact(sha256=f"{i:064x}", spec_hash=HASH, reason="ProgressDeadlineExceeded")
        for i in range(10)
    ]
    p = serving.plan(passed(failed=many), HASH, state(Rollout.failed, NEW))
    assert len(p.failed) == 10 and p.failed[-1].sha256 == NEW.sha256


def test_removing_spec_deployment_clears_serving_status() -> None:
    cur = passed(phase=Phase.failed)
    cur = status.parse(
        serving.apply_plan(
            cur, 3, serving.plan(cur, HASH, state(Rollout.complete, GOOD)), "2024-01-01T00:00:00Z"
        )
    )
    out = status.parse(serving.without_deployment(cur, 4, "2024-01-02T00:00:00Z"))
    assert out.serving_artifact is None and out.last_good_artifact is None
    assert out.phase is Phase.ready
    assert not [c for c in out.conditions if c.type == "Available"]


def test_a_stalled_scale_up_of_the_served_artifact_does_not_mark_it_failed() -> None:
    cur = passed(last_good=NEW)
    p = serving.plan(cur, HASH, state(Rollout.failed, NEW, ready=2))
    assert (p.target, p.phase, p.reason) == (NEW, Phase.failed, "RolloutStalled")
    assert p.failed == () and p.event is None
    # Fixed (e.g. fewer replicas): complete again, Ready.
    assert serving.plan(cur, HASH, state(Rollout.complete, NEW)).phase is Phase.ready


def test_a_new_candidate_is_checked_in_storage_once_before_it_reaches_a_deployment() -> None:
    cur = passed()
    # About to replace GOOD (or to create the first Deployment): check the bytes.
    assert serving.needs_storage_check(cur, HASH, state(Rollout.complete, GOOD), NEW)
    assert serving.needs_storage_check(cur, HASH, state(Rollout.absent, None, 0), NEW)
    # Already on a template (pods check it themselves), rolling back, or no candidate yet.
    assert not serving.needs_storage_check(cur, HASH, state(Rollout.progressing, NEW), NEW)
    assert not serving.needs_storage_check(cur, HASH, state(Rollout.complete, NEW), GOOD)
    compressing = passed(phase=Phase.compressing)
    assert not serving.needs_storage_check(compressing, HASH, state(Rollout.complete, GOOD), GOOD)


def test_a_corrupted_artifact_is_never_rolled_out_and_the_last_good_keeps_serving() -> None:
    marked = serving.mark_corrupted(passed(), HASH, NEW)
    assert [(f.sha256, f.spec_hash, f.reason) for f in marked.failed_artifacts] == [
        (NEW.sha256, HASH, "ArtifactCorrupted")
    ]
    assert serving.mark_corrupted(marked, HASH, NEW) == marked  # recorded once
    for rollout in (Rollout.complete, Rollout.progressing):
        p = serving.plan(marked, HASH, state(rollout, GOOD))
        assert (p.target, p.phase, p.reason, p.available) == (
            GOOD,
            Phase.failed,
            "ArtifactCorrupted",
            "False",
        )
        assert "never rolled out" in p.message and GOOD.sha256[:12] in p.message
    # Nothing served before: no Deployment at all rather than a corrupt one.
    first = serving.mark_corrupted(passed(last_good=None), HASH, NEW)
    p = serving.plan(first, HASH, state(Rollout.absent, None, 0))
    assert (p.target, p.phase, p.reason) == (None, Phase.failed, "ArtifactCorrupted")
    # Another spec hash producing those bytes is judged afresh.
    assert serving.plan(marked, "c" * 16, state(Rollout.complete, GOOD)).reason != (
        "ArtifactCorrupted"
    )


def test_rollout_result_counts_each_ending_once() -> None:
    """edgeslim_rollouts_total{result}: one count when a rollout ends, none on a
    reconcile that only re-reads the same state."""
    deploying = passed()
    done = serving.plan(deploying, HASH, state(Rollout.complete))
    assert serving.rollout_result(deploying, done) == "complete"
    ready = status.parse(serving.apply_plan(deploying, 3, done, "2024-01-02T00:00:00Z"))
    again = serving.plan(ready, HASH, state(Rollout.complete))
    assert serving.rollout_result(ready, again) is None
    # Still rolling: nothing ended.
    rolling = serving.plan(deploying, HASH, state(Rollout.progressing, NEW))
    assert serving.rollout_result(deploying, rolling) is None
    # The deadline passes: one rollback, then RolledBack without another count.
    back = serving.plan(deploying, HASH, state(Rollout.failed, NEW))
    assert serving.rollout_result(deploying, back) == "rolled_back"
    after = passed(failed=list(back.failed))
    settled = serving.plan(after, HASH, state(Rollout.complete, GOOD))
    assert settled.reason == "RolledBack" and serving.rollout_result(after, settled) is None
    # Nothing to return to: failed.
    first = passed(last_good=None)
    lost = serving.plan(first, HASH, state(Rollout.failed, NEW, ready=0))
    assert serving.rollout_result(first, lost) == "failed"
