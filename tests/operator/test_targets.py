"""spec.targets without a cluster: the effective spec per target, validation,
names, the variant body and status summary, and the Job and serving manifests
a target gets."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edgeslim.api.canary import CanaryStatus
from edgeslim.api.spec import CompressedModel, CompressedModelSpec
from edgeslim.api.status import CompressedModelStatus, Phase, TargetStatus
from edgeslim.operator import canary, jobs, runtime, serving, status, variants
from edgeslim.operator.names import MODEL_LABEL, SPEC_ENV, TARGET_LABEL, serving_name
from edgeslim.operator.settings import Settings
from edgeslim.operator.status import Transition
from tests.test_kstatus import kstatus

UID = "0f0e0d0c-0000-4000-8000-000000000002"
AT = "2026-01-01T00:00:00Z"
TARGETS = [
    {
        "name": "x86",
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "quantize": {"mode": "static"},
    },
    {
        "name": "gpu",
        "nodeSelector": {"accelerator": "yes"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "quantize": {"mode": "fp16"},
    },
]


def body(
    targets: list | None = TARGETS, deployment: bool = True, status_: dict | None = None
) -> dict:
    spec: dict = {
        "source": {"uri": "s3://models/digits/cnn.onnx", "credentialsSecret": "s3-creds"},
        "evaluation": {"dataset": "s3://datasets/digits/val.npz"},
        "pipeline": [{"prune": {"sparsity": 0.3}}, {"quantize": {"mode": "dynamic"}}],
        "output": {"uri": "s3://models/edge/"},
    }
    if deployment:
        spec["deployment"] = {"replicas": 2, "nodeSelector": {"node-role.kubernetes.io/edge": ""}}
    if targets is not None:
        spec["targets"] = targets
    return {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {
            "name": "digits",
            "namespace": "vision",
            "uid": UID,
            "generation": 4,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
        "status": status_ or {},
    }


def spec(**kw: object) -> CompressedModelSpec:
    return CompressedModel.model_validate(body(**kw)).spec


# ------------------------------------------------------------- effective spec


def test_a_target_replaces_the_quantize_step_and_merges_its_placement() -> None:
    gpu = spec().for_target("gpu")
    assert [s.type for s in gpu.pipeline or []] == ["prune", "quantize"]
    assert gpu.pipeline[1].quantize.mode.value == "fp16"
    assert gpu.deployment.node_selector == {
        "node-role.kubernetes.io/edge": "",
        "accelerator": "yes",
    }
    assert [t.key for t in gpu.deployment.tolerations] == ["gpu"]
    [only] = gpu.targets
    assert (only.name, only.quantize, only.pipeline) == ("gpu", None, None)
    assert only.node_selector == gpu.deployment.node_selector


def test_each_target_hashes_apart_and_its_spec_is_a_fixed_point() -> None:
    s = spec()
    x86, gpu = s.for_target("x86"), s.for_target("gpu")
    assert len({s.spec_hash(), x86.spec_hash(), gpu.spec_hash()}) == 3
    assert gpu.for_target("gpu") == gpu
    # The same recipe on two node classes is two artifacts (latency is measured there).
    same = spec(targets=[{"name": "a", "nodeSelector": {"c": "a"}}, {"name": "b"}])
    assert same.for_target("a").pipeline == same.for_target("b").pipeline
    assert same.for_target("a").spec_hash() != same.for_target("b").spec_hash()


def test_without_targets_the_hash_is_unchanged() -> None:
    # Objects that existed before spec.targets must keep their Jobs and artifacts.
    assert spec(targets=None).spec_hash() == spec(targets=None).model_copy().spec_hash()
    assert "targets" not in spec(targets=None).wire()


def test_quantize_is_appended_when_the_pipeline_has_none() -> None:
    s = CompressedModelSpec.model_validate(
        {**spec().wire(), "pipeline": [{"prune": {"sparsity": 0.3}}], "targets": TARGETS}
    )
    assert [st.type for st in s.for_target("x86").pipeline or []] == ["prune", "quantize"]


def test_a_whole_pipeline_override_replaces_optimize() -> None:
    wire = spec().wire()
    del wire["pipeline"]
    wire["optimize"] = {}
    wire["targets"] = [{"name": "arm", "pipeline": [{"quantize": {"mode": "dynamic"}}]}]
    arm = CompressedModelSpec.model_validate(wire).for_target("arm")
    assert arm.optimize is None and arm.pipeline[0].quantize.mode.value == "dynamic"


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "names must be unique"),
        ([{"name": "a", "quantize": {}, "pipeline": ["simplify"]}], "at most one"),
        ([{"name": "A"}], "pattern"),
        ([{"name": f"t{i}"} for i in range(17)], "at most 16"),
        ([], "at least 1"),
        ([{"name": "a", "pipeline": [{"quantize": {}}, {"prune": {"sparsity": 0.1}}]}], "follow"),
    ],
)
def test_bad_targets_are_refused(targets: list, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(targets=targets)


def test_a_quantize_override_needs_a_pipeline() -> None:
    wire = spec().wire()
    del wire["pipeline"]
    wire["optimize"] = {}
    with pytest.raises(ValidationError, match=r"quantize: needs spec\.pipeline"):
        CompressedModelSpec.model_validate(wire)


# ------------------------------------------------------------------ names


def test_target_names_are_readable_and_fit() -> None:
    assert serving_name("digits", "gpu") == "digits-gpu"
    assert serving_name("digits") == "digits"
    assert serving_name("3d", "gpu") == "m-3d-gpu"
    long_a, long_b = serving_name("a" * 60, "gpu-a"), serving_name("a" * 60, "gpu-b")
    assert long_a != long_b and max(len(long_a), len(long_b)) <= 63


def test_variant_keys_never_meet_object_keys() -> None:
    key = variants.variant_key("vision", "digits", "gpu")
    assert key == ("vision", "digits/gpu")
    assert variants.split(key) == ("vision", "digits", "gpu")
    assert variants.split(("vision", "digits")) == ("vision", "digits", "")
    assert variants.variant_key("vision", "digits") == ("vision", "digits")


# ------------------------------------------------------------- variant body


def test_a_variant_body_is_the_object_with_the_target_spec_and_entry() -> None:
    entry = {"name": "gpu", "phase": "Compressing", "specHash": "ab" * 8, "jobName": "j"}
    b = body(status_={"phase": "Compressing", "targets": [entry]})
    v = variants.variant_body(b, "gpu")
    assert v is not None
    assert v["metadata"] == b["metadata"]
    assert v["status"] == {"phase": "Compressing", "specHash": "ab" * 8, "jobName": "j"}
    model = runtime.parse_model(v)
    assert model.spec.spec_hash() == spec().for_target("gpu").spec_hash()
    assert runtime.model_key(v) == ("vision", "digits/gpu")
    assert variants.variant_body(b, "arm") is None


def test_the_model_index_has_one_entry_per_target() -> None:
    entries = [
        {"name": "x86", "phase": "Queued", "jobName": "digits-1", "observedGeneration": 4},
        {"name": "gone", "phase": "Ready"},
    ]
    found = runtime.model_entries("vision", "digits", body(status_={"targets": entries}))
    assert set(found) == {("vision", "digits/x86")}
    x86 = found[("vision", "digits/x86")]
    assert (x86.phase, x86.job_name, x86.generation, x86.observed_generation) == (
        "Queued",
        "digits-1",
        4,
        4,
    )
    plain = runtime.model_entries("vision", "digits", body(None, status_={"phase": "Ready"}))
    assert list(plain) == [("vision", "digits")]


# ----------------------------------------------------------------- summary


def entry(name: str, phase: Phase) -> dict:
    cur = CompressedModelStatus()
    t = Transition(phase, phase.value, f"{name} is {phase.value}", spec_hash="0" * 16)
    return variants.entry_of(name, status.apply(cur, 4, t, AT))


@pytest.mark.parametrize(
    ("phases", "phase", "reconciling", "stalled", "count"),
    [
        ((Phase.ready, Phase.ready), Phase.ready, "False", "False", "2/2"),
        ((Phase.ready, Phase.compressing), Phase.compressing, "True", "False", "1/2"),
        ((Phase.rejected, Phase.compressing), Phase.compressing, "True", "False", "0/2"),
        ((Phase.deploying, Phase.queued), Phase.queued, "True", "False", "0/2"),
        ((Phase.ready, Phase.rejected), Phase.rejected, "False", "True", "1/2"),
        ((Phase.rejected, Phase.failed), Phase.failed, "False", "True", "0/2"),
        ((Phase.ready, None), Phase.pending, "True", "False", "1/2"),
    ],
)
def test_the_object_sums_up_its_targets(
    phases: tuple, phase: Phase, reconciling: str, stalled: str, count: str
) -> None:
    names = ["x86", "gpu"]
    entries = [entry(n, p) for n, p in zip(names, phases, strict=True) if p is not None]
    out = CompressedModelStatus.model_validate(variants.aggregate({}, entries, names, 4, AT))
    assert out.phase is phase and out.targets_ready == count
    assert [t.name for t in out.targets or []] == names
    conds = {c.type: c for c in out.conditions}
    assert (conds["Reconciling"].status, conds["Stalled"].status) == (reconciling, stalled)
    assert conds["Ready"].status == {"Ready": "True", "Rejected": "False", "Failed": "False"}.get(
        phase.value, "Unknown"
    )
    assert all(c.observed_generation == 4 for c in out.conditions)
    assert out.observed_generation == 4 and out.artifact is None


def test_one_target_write_keeps_the_others_and_drops_removed_ones() -> None:
    current = variants.aggregate(
        {}, [entry("x86", Phase.ready), entry("old", Phase.ready)], ["x86", "old"], 3, AT
    )
    new_view = status.apply(
        CompressedModelStatus(), 4, Transition(Phase.compressing, "Compressing", "go"), AT
    )
    out = variants.with_target(current, "gpu", new_view, ["x86", "gpu"], 4, AT)
    parsed = [TargetStatus.model_validate(t) for t in out["targets"]]
    assert [(t.name, t.phase) for t in parsed] == [("x86", Phase.ready), ("gpu", Phase.compressing)]
    assert out["targetsReady"] == "1/2" and out["phase"] == "Compressing"
    assert "targets" not in variants.without_targets(out)


# ------------------------------------------------------------------ manifests


def variant_model(name: str) -> CompressedModel:
    v = variants.variant_body(body(), name)
    assert v is not None
    return runtime.parse_model(v)


def test_a_target_job_runs_on_its_node_class() -> None:
    gpu = variant_model("gpu")
    h = gpu.spec.spec_hash()
    job = jobs.build_job(gpu, Settings(), h)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/edge": "", "accelerator": "yes"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[TARGET_LABEL] == "gpu" and labels[MODEL_LABEL] == "digits"
    ref = jobs.JobRef.of({**job, "metadata": {**job["metadata"], "uid": "j"}})
    assert ref.key == ("vision", "digits/gpu") and ref.spec_hash == h
    # The compressor gets the target's spec: it computes the same hash and prefix.
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    sent = CompressedModel.model_validate(json.loads(env[SPEC_ENV]))
    assert sent.spec.spec_hash() == h


def test_a_plain_job_has_no_target_label_or_placement() -> None:
    plain = CompressedModel.model_validate(body(targets=None))
    job = jobs.build_job(plain, Settings(), plain.spec.spec_hash())
    assert TARGET_LABEL not in job["metadata"]["labels"]
    assert "nodeSelector" not in job["spec"]["template"]["spec"]


def test_a_target_deployment_and_service_are_its_own() -> None:
    gpu = variant_model("gpu")
    artifact = serving.ServedArtifact(uri="s3://models/edge/m.onnx", sha256="1" * 64)
    dep = serving.build_deployment(gpu, artifact, Settings())
    svc = serving.build_service(gpu)
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "digits-gpu"
    selector = {
        MODEL_LABEL: "digits",
        "app.kubernetes.io/component": "serving",
        TARGET_LABEL: "gpu",
    }
    assert dep["spec"]["selector"]["matchLabels"] == selector == svc["spec"]["selector"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["accelerator"] == "yes"
    assert pod["tolerations"][0]["key"] == "gpu"
    # Clients call the same model name on every node class.
    command = pod["containers"][0]["command"]
    assert command[command.index("--name") + 1] == "digits"


@pytest.mark.parametrize(
    ("phases", "verdict"),
    [
        ((Phase.ready, Phase.ready), "Current"),
        ((Phase.ready, Phase.compressing), "InProgress"),
        # One target's verdict is in, the other still compresses: not Failed yet.
        ((Phase.rejected, Phase.compressing), "InProgress"),
        ((Phase.ready, Phase.rejected), "Failed"),
        ((Phase.deploying, Phase.failed), "InProgress"),
    ],
)
def test_kstatus_reads_the_summary(phases: tuple, verdict: str) -> None:
    """The real kstatus code (tools/kstatus, see tests/test_kstatus.py) on the summary."""
    names = ["x86", "gpu"]
    entries = [entry(n, p) for n, p in zip(names, phases, strict=True)]
    assert kstatus(variants.aggregate({}, entries, names, 3, AT), generation=3) == verdict


def test_target_entries_carry_the_objects_labels_and_policy() -> None:
    # CompressionPolicies select and count objects by these, a target under its object.
    b = body(
        status_={
            "policy": {"name": "fleet", "generation": 2},
            "targets": [entry("x86", Phase.ready)],
        }
    )
    b["metadata"]["labels"] = {"team": "vision"}
    [x86] = runtime.model_entries("vision", "digits", b).values()
    assert (x86.labels, x86.policy, x86.policy_generation) == ((("team", "vision"),), "fleet", 2)


# ------------------------------------------------------------------ canary


def canary_body(**kw: object) -> dict:
    b = body(**kw)
    b["spec"]["deployment"]["canary"] = {"steps": [50, 100]}
    return b


def test_a_target_canary_deployment_is_its_own_and_behind_its_service() -> None:
    assert canary.canary_name("digits", "gpu") == "digits-gpu-canary"
    assert canary.canary_name("digits") == "digits-canary"
    assert canary.canary_name("a" * 60, "gpu-a") != canary.canary_name("a" * 60, "gpu-b")
    models = {}
    for name in ("x86", "gpu"):
        v = variants.variant_body(canary_body(), name)
        assert v is not None
        models[name] = runtime.parse_model(v)
    artifact = serving.ServedArtifact(uri="s3://models/edge/m.onnx", sha256="1" * 64)
    dep = canary.build_canary_deployment(models["gpu"], artifact, 1, "", Settings())
    assert dep["metadata"]["name"] == "digits-gpu-canary"
    pods = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert (pods[TARGET_LABEL], pods[canary.TRACK_LABEL]) == ("gpu", "canary")
    assert dep["spec"]["template"]["spec"]["nodeSelector"]["accelerator"] == "yes"
    # The target's Service reaches its canary pods; the other target's never does.
    assert serving.build_service(models["gpu"])["spec"]["selector"].items() <= pods.items()
    assert not serving.build_service(models["x86"])["spec"]["selector"].items() <= pods.items()
    assert canary.selector("digits", "gpu", canary=True) == (
        f"{MODEL_LABEL}=digits,app.kubernetes.io/component=serving,"
        f"{TARGET_LABEL}=gpu,{canary.TRACK_LABEL}=canary"
    )


def test_a_target_entry_carries_its_canary_and_the_summary_none() -> None:
    c = CanaryStatus(artifact="c" * 64, stable="a" * 64, weight=50, shown="50%", step_started=AT)
    new_view = {**entry("gpu", Phase.deploying), "canary": c.wire()}
    del new_view["name"]
    # The object's own canary from before it had targets does not stay in the summary.
    current = {**variants.aggregate({}, [entry("x86", Phase.ready)], ["x86", "gpu"], 4, AT)}
    current["canary"] = c.model_copy(update={"artifact": "d" * 64}).wire()
    out = variants.with_target(current, "gpu", new_view, ["x86", "gpu"], 4, AT)
    assert "canary" not in out
    assert [t.get("canary") for t in out["targets"]] == [None, c.wire()]
    view = variants.view(out, "gpu")
    assert status.parse(view).canary == c
    v = variants.variant_body(canary_body(status_=out), "gpu")
    assert v is not None and status.parse(v["status"]).canary == c
    assert status.parse(variants.view(out, "x86")).canary is None


def test_a_target_may_not_be_named_as_another_targets_canary() -> None:
    targets = [{"name": "gpu"}, {"name": "gpu-canary"}]
    with pytest.raises(ValidationError, match="no target may be named <another target>-canary"):
        CompressedModel.model_validate(canary_body(targets=targets))
    CompressedModel.model_validate(body(targets=targets))  # without a canary: no clash
