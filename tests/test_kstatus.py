"""What Flux's kstatus makes of a CompressedModel in every phase.

The status comes from the operator's own status builders (the compression
transitions and the serving rollout plan), and the verdict from the real kstatus
code: `tools/kstatus`, a small Go program around
sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute that `make controlplane`
builds from the Go module proxy. The last test stores each status on a real
API server first (CRD status schema, merge patches as the operator writes them)
and asks kstatus about the live object.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeslim.api.base import API_GROUP, API_VERSION, PLURAL
from edgeslim.api.status import CompressedModelStatus, Phase, ServedArtifact
from edgeslim.operator import serving, status
from edgeslim.operator.serving import Rollout, RolloutState
from tests.cluster.fixtures import K8s
from tests.cluster.tools import cache_dir, read_versions
from tests.operator.support import apply_crd

Obj = dict[str, Any]
GENERATION = 3
HASH = "bbbbbbbbbbbbbbbb"
GOOD = ServedArtifact(uri="s3://models/edge/digits/aaaa/model.onnx", sha256="a" * 64)
NEW = ServedArtifact(uri="s3://models/edge/digits/bbbb/model.onnx", sha256="b" * 64)


def kstatus_binary() -> Path:
    version = read_versions()["CLI_UTILS_VERSION"]
    path = cache_dir() / f"kstatus-{version}" / "kstatus"
    if not path.exists():
        pytest.fail(f"kstatus is not built ({path}); run `make controlplane`", pytrace=False)
    return path


def kstatus(raw_status: Obj | None, generation: int | None = GENERATION) -> str:
    """kstatus' verdict (InProgress, Current, Failed, ...) on a CompressedModel with
    this status; generation None: `raw_status` is a whole object, as it is."""
    if generation is None:
        obj: Obj = raw_status or {}
    else:
        obj = {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": "digits", "namespace": "vision", "generation": generation},
            "spec": {},
        }
        if raw_status is not None:
            obj["status"] = raw_status
    out = subprocess.run(
        [str(kstatus_binary())],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["status"]


def transition(
    cur: CompressedModelStatus, phase: Phase, reason: str, message: str = "m"
) -> CompressedModelStatus:
    t = status.Transition(phase, reason, message, spec_hash=HASH, job_name="digits-bbbb")
    return status.parse(status.apply(cur, GENERATION, t, "2026-01-01T00:00:00Z"))


def compressed(phase: Phase) -> CompressedModelStatus:
    """Status right after the compressor's verdict: passed (Deploying) or not."""
    cur = transition(status.parse({}), Phase.compressing, "Compressing")
    raw = cur.wire() | {
        "artifact": {"uri": NEW.uri, "sha256": NEW.sha256, "sizeBytes": 1},
    }
    reason = {Phase.deploying: "GatePassed", Phase.rejected: "GateRejected"}.get(
        phase, "CompressionFailed"
    )
    t = status.Transition(
        phase,
        reason,
        "drop 0.001 within 0.01",
        spec_hash=HASH,
        job_name="digits-bbbb",
        artifact=status.parse(raw).artifact,
    )
    return status.parse(status.apply(cur, GENERATION, t, "2026-01-01T00:01:00Z"))


def rolled(cur: CompressedModelStatus, rollout: Rollout, artifact: ServedArtifact) -> Obj:
    """Status after the serving rollout plan for a Deployment in `rollout`."""
    st = RolloutState(rollout, artifact, replicas=2, ready_replicas=2, updated_replicas=2)
    return serving.apply_plan(cur, GENERATION, serving.plan(cur, HASH, st), "2026-01-01T00:02:00Z")


@pytest.mark.parametrize("phase", [Phase.pending, Phase.queued, Phase.compressing, Phase.deploying])
def test_work_in_progress_reads_in_progress(phase: Phase) -> None:
    raw = transition(status.parse({}), phase, phase.value).wire()
    assert raw["phase"] == phase.value
    assert kstatus(raw) == "InProgress"


def test_the_lifecycle_of_a_deployed_model() -> None:
    deploying = compressed(Phase.deploying)
    assert deploying.phase is Phase.deploying
    assert kstatus(deploying.wire()) == "InProgress"
    # The Deployment rolls out: still in progress.
    rolling = rolled(deploying, Rollout.progressing, NEW)
    assert rolling["phase"] == "Deploying"
    assert kstatus(rolling) == "InProgress"
    # Every replica serves the new artifact.
    ready = rolled(status.parse(rolling), Rollout.complete, NEW)
    assert ready["phase"] == "Ready"
    assert kstatus(ready) == "Current"
    # The spec changed and the operator has not caught up yet.
    assert kstatus(ready, generation=GENERATION + 1) == "InProgress"


def test_ready_without_a_deployment_is_current() -> None:
    raw = transition(compressed(Phase.deploying), Phase.ready, "GatePassed").wire()
    assert kstatus(raw) == "Current"
    assert kstatus(raw, generation=GENERATION + 1) == "InProgress"


@pytest.mark.parametrize("phase", [Phase.rejected, Phase.failed])
def test_rejected_and_failed_read_failed(phase: Phase) -> None:
    raw = compressed(phase).wire()
    assert raw["phase"] == phase.value
    assert kstatus(raw) == "Failed"
    # An edit of the spec is a new attempt: in progress until it is observed.
    assert kstatus(raw, generation=GENERATION + 1) == "InProgress"


def test_a_rolled_back_rollout_reads_failed() -> None:
    deploying = compressed(Phase.deploying)
    cur = deploying.model_copy(update={"last_good_artifact": GOOD})
    # The new artifact's pods never got ready: the operator rolls back ...
    back = status.parse(rolled(cur, Rollout.failed, NEW))
    assert back.phase is Phase.deploying and "rolling back" in (back.message or "")
    assert kstatus(back.wire()) == "InProgress"
    # ... and once the last good one serves again, it cannot progress by itself.
    done = rolled(back, Rollout.complete, GOOD)
    assert done["phase"] == "Failed"
    assert kstatus(done) == "Failed"


def test_a_status_from_before_the_generation_reads_in_progress() -> None:
    raw = transition(status.parse({}), Phase.ready, "GatePassed").wire()
    raw["observedGeneration"] = GENERATION - 1
    assert kstatus(raw) == "InProgress"


# --- through a real API server ---------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits" / "digits-s3.yaml"


@pytest.mark.cluster
def test_live_objects_read_the_same_after_the_api_server_stored_them(
    k8s: K8s, namespace: str
) -> None:
    """The statuses go through the CRD's status schema (pruning, list-map merge of
    conditions) the way the operator writes them: as merge patches."""
    apply_crd(k8s)
    api = (API_GROUP, API_VERSION, namespace, PLURAL)
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"name": "digits"}
    k8s.custom.create_namespaced_custom_object(*api, body)
    for drop in (0.02, 0.03):  # two spec edits: metadata.generation 3, as the builders say
        patch = {"spec": {"evaluation": {"maxMetricDrop": drop}}}
        k8s.custom.patch_namespaced_custom_object(*api, "digits", patch)

    deploying = compressed(Phase.deploying)
    rolling = rolled(deploying, Rollout.progressing, NEW)
    steps: list[tuple[str, Obj, str]] = [
        *(
            (p.value, transition(status.parse({}), p, p.value).wire(), "InProgress")
            for p in (Phase.pending, Phase.queued, Phase.compressing)
        ),
        ("Deploying", rolling, "InProgress"),
        ("Ready", rolled(status.parse(rolling), Rollout.complete, NEW), "Current"),
        ("Rejected", compressed(Phase.rejected).wire(), "Failed"),
        ("Failed", compressed(Phase.failed).wire(), "Failed"),
        ("Ready", transition(deploying, Phase.ready, "GatePassed").wire(), "Current"),
    ]
    old: Obj = {}
    for phase, new, expected in steps:
        k8s.custom.patch_namespaced_custom_object_status(
            *api, "digits", {"status": status.merge_patch(old, new)}
        )
        live = k8s.custom.get_namespaced_custom_object(*api, "digits")
        assert live["status"]["phase"] == phase
        types = {c["type"] for c in live["status"]["conditions"]}
        assert {"Reconciling", "Stalled"} <= types
        assert (phase, kstatus(live, generation=None)) == (phase, expected)
        old = new
    # A spec edit the operator has not seen yet.
    patch = {"spec": {"evaluation": {"maxMetricDrop": 0.04}}}
    k8s.custom.patch_namespaced_custom_object(*api, "digits", patch)
    assert kstatus(k8s.custom.get_namespaced_custom_object(*api, "digits"), None) == "InProgress"
