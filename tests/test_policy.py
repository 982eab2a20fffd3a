"""CompressionPolicy without a cluster: the merge rule, label selection, the
effective spec and its hash, per-policy queue limits and the status counts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from edgeslim.api.merge import deep_merge, merge_spec
from edgeslim.api.policy import CompressionPolicy, LabelSelector
from edgeslim.operator import policy, runtime
from edgeslim.operator.queue import Slots, Waiting

Obj = dict[str, Any]
NS = "team-a"


def _policy(
    name: str = "gate",
    *,
    selector: Obj | None = None,
    defaults: Obj | None = None,
    generation: int = 1,
    max_concurrent: int = 2,
) -> Obj:
    return {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressionPolicy",
        "metadata": {"name": name, "namespace": NS, "generation": generation},
        "spec": {
            "selector": selector if selector is not None else {"matchLabels": {"team": "a"}},
            "defaults": defaults
            if defaults is not None
            else {
                "evaluation": {"metric": "accuracy", "maxMetricDrop": 0.02, "latencyRuns": 7},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
                "deployment": {"replicas": 2, "nodeSelector": {"edge": "true"}},
            },
            "maxConcurrent": max_concurrent,
        },
    }


def _model(name: str = "m1", labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    body_spec = {
        "source": {"uri": "s3://models/a/cnn.onnx"},
        "evaluation": {"dataset": "s3://models/a/val.npz"},
        "output": {"uri": "s3://models/edge/"},
    }
    body_spec.update(spec)
    return {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"team": "a"} if labels is None else labels,
            "uid": "u1",
            "generation": 1,
        },
        "spec": body_spec,
    }


def _spelled_out(**spec: Any) -> Obj:
    """_model() with what _policy()'s default evaluation and pipeline give it written out."""
    return _model(
        evaluation={
            "dataset": "s3://models/a/val.npz",
            "metric": "accuracy",
            "maxMetricDrop": 0.02,
            "latencyRuns": 7,
        },
        pipeline=[{"quantize": {"mode": "dynamic"}}],
        **spec,
    )


def _effective(model: Obj, *policies: Obj) -> Any:
    entries = [policy.policy_entry(p) for p in policies]
    chosen = policy.policy_for(entries, model)
    return policy.effective_body(model, chosen)


# ------------------------------------------------------------------ merge rule


def test_mappings_merge_per_key_and_the_model_wins() -> None:
    merged = merge_spec(
        {"evaluation": {"metric": "accuracy", "maxMetricDrop": 0.01}},
        {"evaluation": {"dataset": "s3://d/val.npz", "maxMetricDrop": 0.02}},
    )
    assert merged["evaluation"] == {
        "metric": "accuracy",
        "maxMetricDrop": 0.02,
        "dataset": "s3://d/val.npz",
    }


def test_nested_mappings_merge_and_lists_are_replaced_whole() -> None:
    base = {
        "deployment": {
            "nodeSelector": {"edge": "true", "arch": "arm64"},
            "tolerations": [{"key": "edge"}, {"key": "gpu"}],
            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
        }
    }
    over = {
        "deployment": {
            "nodeSelector": {"arch": "amd64"},
            "tolerations": [{"key": "only"}],
            "resources": {"limits": {"memory": "2Gi"}},
        }
    }
    merged = merge_spec(base, over)["deployment"]
    assert merged["nodeSelector"] == {"edge": "true", "arch": "amd64"}
    assert merged["tolerations"] == [{"key": "only"}]
    assert merged["resources"] == {"limits": {"cpu": "1", "memory": "2Gi"}}


@pytest.mark.parametrize("own", ["pipeline", "optimize"])
def test_pipeline_and_optimize_are_one_choice(own: str) -> None:
    mine = {"pipeline": [{"simplify": {}}]} if own == "pipeline" else {"optimize": {}}
    for theirs in ({"pipeline": [{"quantize": {}}]}, {"optimize": {"maxCandidates": 3}}):
        merged = merge_spec(theirs, mine)
        assert merged == mine, (theirs, merged)


def test_null_is_not_set_and_inputs_are_not_changed() -> None:
    base = {"evaluation": {"metric": "cosine"}, "pipeline": [{"quantize": {}}]}
    over = {"evaluation": {"metric": None}, "pipeline": None}
    before = copy.deepcopy((base, over))
    assert merge_spec(base, over) == base
    assert (base, over) == before
    assert deep_merge({}, {"a": {"b": 1}}) == {"a": {"b": 1}}


# ------------------------------------------------------------------ selector


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({}, {}, True),  # empty selects everything, as metav1 reads it
        ({"matchLabels": {"team": "a"}}, {"team": "a", "x": "y"}, True),
        ({"matchLabels": {"team": "a"}}, {"team": "b"}, False),
        (
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["1", "2"]}]},
            {"tier": "2"},
            True,
        ),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["1"]}]},
            {"tier": "1"},
            False,
        ),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": ""}, False),
        (
            {
                "matchLabels": {"team": "a"},
                "matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}],
            },
            {"team": "a"},
            True,
        ),
    ],
)
def test_label_selector(selector: Obj, labels: dict[str, str], selected: bool) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is selected


@pytest.mark.parametrize(
    "requirement",
    [
        {"key": "k", "operator": "In", "values": []},
        {"key": "k", "operator": "Exists", "values": ["v"]},
        {"key": "k", "operator": "Near"},
    ],
)
def test_malformed_requirements_are_refused(requirement: Obj) -> None:
    with pytest.raises(ValidationError):
        LabelSelector.model_validate({"matchExpressions": [requirement]})


def test_a_policy_selects_only_in_its_own_namespace() -> None:
    entry = policy.policy_entry(_policy())
    assert entry.selects(NS, {"team": "a"})
    assert not entry.selects("team-b", {"team": "a"})


def test_a_policy_with_both_recipes_is_refused() -> None:
    body = _policy(defaults={"pipeline": [{"quantize": {}}], "optimize": {}})
    with pytest.raises(ValidationError, match="at most one of pipeline and optimize"):
        CompressionPolicy.model_validate(body)
    entry = policy.policy_entry(body)  # the index keeps it, selecting nothing
    assert entry.policy is None and "pipeline and optimize" in entry.error
    assert not entry.selects(NS, {"team": "a"})


# --------------------------------------------------------- the effective spec


def test_model_inherits_the_gate_pipeline_and_placement() -> None:
    body = _effective(_model(), _policy())
    spec = runtime.CompressedModel.model_validate(body).spec
    assert spec.evaluation.max_metric_drop == 0.02 and spec.evaluation.latency_runs == 7
    assert str(spec.evaluation.dataset) == "s3://models/a/val.npz"
    assert [s.type for s in spec.pipeline] == ["quantize"]
    assert spec.deployment.replicas == 2 and spec.deployment.node_selector == {"edge": "true"}


def test_object_fields_override_the_policy() -> None:
    own = _model(
        evaluation={"dataset": "s3://models/a/val.npz", "maxMetricDrop": 0.0},
        optimize={"maxCandidates": 4},
        deployment={"replicas": 5},
    )
    spec = runtime.CompressedModel.model_validate(_effective(own, _policy())).spec
    assert spec.evaluation.max_metric_drop == 0.0 and spec.evaluation.latency_runs == 7
    assert spec.pipeline is None and spec.optimize.max_candidates == 4
    assert spec.deployment.replicas == 5 and spec.deployment.node_selector == {"edge": "true"}


def test_a_policy_edit_changes_the_spec_hash_of_what_it_supplies() -> None:
    def hash_under(p: Obj, m: Obj | None = None) -> str:
        body = _effective(m or _model(), p)
        return runtime.CompressedModel.model_validate(body).spec.spec_hash()

    base = hash_under(_policy())
    stricter = _policy(generation=2)
    stricter["spec"]["defaults"]["evaluation"]["maxMetricDrop"] = 0.005
    assert hash_under(stricter) != base
    # Placement is not part of the artifact: same hash, no re-compression.
    moved = _policy(generation=3)
    moved["spec"]["defaults"]["deployment"]["replicas"] = 9
    assert hash_under(moved) == base
    # A model that sets its own gate does not follow the policy's.
    own = _model(evaluation={"dataset": "s3://models/a/val.npz", "maxMetricDrop": 0.03})
    assert hash_under(stricter, own) == hash_under(_policy(), own)


def test_the_same_spec_written_out_hashes_the_same() -> None:
    """A model inheriting everything hashes like one that spells it all out, so the
    CLI reproduces what the operator compresses from the effective spec."""
    inherited = runtime.CompressedModel.model_validate(_effective(_model(), _policy()))
    spelled = _spelled_out()
    assert (
        inherited.spec.spec_hash()
        == runtime.CompressedModel.model_validate(spelled).spec.spec_hash()
    )


def test_two_policies_selecting_a_model_name_both() -> None:
    other = _policy("other", selector={"matchExpressions": [{"key": "team", "operator": "Exists"}]})
    with pytest.raises(policy.PolicyConflict, match="gate and other"):
        _effective(_model(), _policy(), other)


def test_missing_evaluation_without_a_policy_is_invalid_spec_saying_so() -> None:
    body = _model(labels={})
    del body["spec"]["evaluation"]
    body["spec"]["pipeline"] = [{"quantize": {}}]
    with pytest.raises(runtime.InvalidSpec, match="no CompressionPolicy selects this object"):
        runtime.parse_model(body)
    body = _model(labels={})  # evaluation but neither pipeline nor optimize
    with pytest.raises(runtime.InvalidSpec, match="exactly one of pipeline and optimize"):
        runtime.parse_model(body)


# ------------------------------------------------------------------ the queue


def test_policy_groups_cap_each_policy_within_the_overall_limit() -> None:
    slots = Slots(0)  # no overall limit: the policies' own limits still hold
    groups = {(NS, f"a{i}"): ((NS, "pa"), 2) for i in range(5)}
    groups |= {(NS, f"b{i}"): ((NS, "pb"), 1) for i in range(3)}
    queued = [Waiting(f"t{i}", NS, f"a{i}", f"a{i}-job") for i in range(5)]
    queued += [Waiting(f"t{i}", NS, f"b{i}", f"b{i}-job") for i in range(3)]
    queued.append(Waiting("t9", NS, "free", "free-job"))
    first = slots.take(queued, {}, groups)
    assert sorted(w.name for w in first) == ["a0", "a1", "b0", "free"]
    # a0 now runs (seen by the index), a1's reservation stands: nothing more for pa.
    again = slots.take(queued, {(NS, "a0"): {"a0-job"}}, groups)
    assert again == []
    # a0 and a1 finished: the next two of pa, in order.
    slots.release((NS, "a0"), "a0-job")
    slots.release((NS, "a1"), "a1-job")
    later = [w for w in queued if w.name not in ("a0", "a1", "b0", "free")]
    assert sorted(w.name for w in slots.take(later, {}, groups)) == ["a2", "a3"]


def test_the_overall_limit_still_binds() -> None:
    slots = Slots(1)
    groups = {(NS, f"a{i}"): ((NS, "pa"), 5) for i in range(3)}
    queued = [Waiting(f"t{i}", NS, f"a{i}", f"a{i}-job") for i in range(3)]
    assert [w.name for w in slots.take(queued, {}, groups)] == ["a0"]


# ------------------------------------------------------------------ counts


def test_counts_ready_only_for_the_current_generation() -> None:
    entry = policy.policy_entry(_policy(generation=3))
    states = [
        policy.ModelState("Ready", "gate", 3),
        policy.ModelState("Ready", "gate", 2),  # still the old policy's result
        policy.ModelState("Rejected", "gate", 3),
        policy.ModelState("Failed", None, None),
        policy.ModelState("Compressing", "gate", 3),
        policy.ModelState(None, None, None),
    ]
    assert policy.counts(entry, states) == {
        "models": 6,
        "ready": 1,
        "rejected": 1,
        "failed": 1,
        "pending": 3,
    }


def test_our_own_status_write_coming_back_writes_nothing() -> None:
    """The policy's status write comes back as a policy event with the same
    generation: it must not set off a recount (that looped to ~8 writes a model)."""
    from edgeslim.operator.policy_sync import event_action

    assert event_action("MODIFIED", 3, 3) == "none"  # status (or metadata) only
    assert event_action("MODIFIED", 3, 4) == "reconcile"  # the spec changed
    assert event_action("ADDED", "unseen", 1) == "reconcile"  # a new policy
    assert event_action("DELETED", 3, 3) == "reconcile"
    assert event_action(None, "unseen", 3) == "refresh"  # the listing at startup
    # The recount the model events drive writes only when a count or condition moved.
    body = _policy(generation=3)
    states = [policy.ModelState("Ready", "gate", 3), policy.ModelState("Queued", "gate", 3)]
    body["status"] = policy.policy_status(policy.policy_entry(body), states, "2026-01-01T00:00:00Z")
    echoed = policy.policy_entry(body)
    later = policy.policy_status(echoed, states, "2026-01-01T00:05:00Z")
    assert policy.same_status(echoed.status, later)
    states[1] = policy.ModelState("Ready", "gate", 3)
    moved = policy.policy_status(echoed, states, "2026-01-01T00:05:00Z")
    assert not policy.same_status(echoed.status, moved) and moved["ready"] == 2


def _conditions(status: Obj) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_conditions_follow_kstatus() -> None:
    entry = policy.policy_entry(_policy(generation=4))
    at = "2026-01-01T00:00:00Z"
    working = policy.policy_status(entry, [policy.ModelState("Queued", "gate", 4)], at)
    assert working["observedGeneration"] == 4 and working["pending"] == 1
    assert _conditions(working)["Reconciling"] == ("True", "ModelsPending")
    assert _conditions(working)["Stalled"][0] == "False"
    done = policy.policy_status(entry, [policy.ModelState("Ready", "gate", 4)] * 3, at)
    assert (done["models"], done["ready"]) == (3, 3)
    assert _conditions(done) == {
        "Ready": ("True", "AllModelsReady"),
        "Reconciling": ("False", "Settled"),
        "Stalled": ("False", "Ok"),
    }
    stuck = policy.policy_status(
        entry, [policy.ModelState("Ready", "gate", 4), policy.ModelState("Rejected", "gate", 4)], at
    )
    assert _conditions(stuck)["Stalled"] == ("True", "ModelsRejected")
    assert _conditions(stuck)["Ready"] == ("False", "ModelsRejected")
    assert policy.same_status(
        done,
        policy.policy_status(
            entry, [policy.ModelState("Ready", "gate", 4)] * 3, "2027-01-01T00:00:00Z"
        ),
    )


def test_an_object_with_targets_counts_once() -> None:
    body = _model()
    body["spec"]["targets"] = [{"name": "arm64"}, {"name": "x86"}]
    body["status"] = {
        "policy": {"name": "gate", "generation": 1},
        "targets": [{"name": "arm64", "phase": "Ready"}, {"name": "x86", "phase": "Queued"}],
    }
    entries = runtime.model_entries(NS, "m1", body)
    assert len(entries) == 2
    assert all(dict(e.labels) == {"team": "a"} and e.policy == "gate" for e in entries.values())
    state = policy.object_state(list(entries.values()))
    assert state == policy.ModelState("Queued", "gate", 1)
    ready = [
        runtime.ModelEntry("", "Ready", None, None, 1, 1),
        runtime.ModelEntry("", "Rejected", None, None, 1, 1),
    ]
    assert policy.object_state(ready).phase == "Rejected"
    failed = [*ready, runtime.ModelEntry("", "Failed", None, None, 1, 1)]
    assert policy.object_state(failed).phase == "Failed"


@pytest.mark.parametrize(
    ("states", "observed", "verdict"),
    [
        ([policy.ModelState("Compressing", "gate", 4)], 4, "InProgress"),
        ([policy.ModelState("Ready", "gate", 3)], 4, "InProgress"),  # an older generation
        ([policy.ModelState("Ready", "gate", 4)] * 2, 4, "Current"),
        ([], 4, "Current"),
        (
            [policy.ModelState("Ready", "gate", 4), policy.ModelState("Failed", None, None)],
            4,
            "Failed",
        ),
        ([policy.ModelState("Ready", "gate", 4)], 3, "InProgress"),  # status not caught up
    ],
)
def test_kstatus_reads_the_policy_status(
    states: list[policy.ModelState], observed: int, verdict: str
) -> None:
    """The real kstatus code (tests/test_kstatus.py builds it) on a policy's status."""
    from tests.test_kstatus import kstatus

    body = _policy(generation=observed)
    raw = policy.policy_status(policy.policy_entry(body), states, "2026-01-01T00:00:00Z")
    body["metadata"]["generation"] = 4
    assert kstatus({**body, "status": raw}, generation=None) == verdict


def test_the_example_policy_and_its_models() -> None:
    """examples/digits/policy.yaml: the policy parses, each model's effective spec is
    complete, and digits-strict's own keys win over the policy's."""
    docs = list(
        yaml.safe_load_all(
            (Path(__file__).parent.parent / "examples/digits/policy.yaml").read_text()
        )
    )
    pol, *models = docs
    pol["metadata"]["namespace"] = "vision"
    entry = policy.policy_entry(pol)
    assert entry.policy is not None and entry.policy.spec.max_concurrent == 2
    specs = {}
    for m in models:
        m["metadata"]["namespace"] = "vision"
        chosen = policy.policy_for([entry], m)
        assert chosen is entry
        specs[m["metadata"]["name"]] = runtime.CompressedModel.model_validate(
            policy.effective_body(m, chosen)
        ).spec
    assert specs["digits-cnn"].evaluation.max_metric_drop == 0.01
    assert specs["digits-strict"].evaluation.max_metric_drop == 0.0
    assert [s.type for s in specs["digits-strict"].pipeline] == ["simplify", "quantize"]
    assert specs["digits-cnn"].deployment.replicas == 2
    assert specs["digits-strict"].deployment.replicas == 1
    assert specs["digits-strict"].deployment.node_selector == {"node-role.kubernetes.io/edge": ""}


# ------------------------------------------------------------------ the CLI


def _write(path: Path, doc: Obj) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_compresses_what_the_operator_would(tmp_path: Path) -> None:
    """`edgeslim validate --policy` merges like the operator: same spec hash as the
    spec written out in full; without the policy, exit 2 and one line saying why."""
    model = _model()
    del model["metadata"]["namespace"], model["metadata"]["uid"], model["metadata"]["generation"]
    spec = _write(tmp_path / "model.yaml", model)
    pol = _write(tmp_path / "policy.yaml", _policy())
    spelled = _spelled_out(deployment={"replicas": 2, "nodeSelector": {"edge": "true"}})
    expected = runtime.CompressedModel.model_validate(spelled).spec.spec_hash()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "edgeslim.cli", "validate", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    done = cli(str(spec), "--policy", str(pol))
    assert done.returncode == 0, done.stderr
    assert f"spec hash {expected}, 1 steps (quantize)" in done.stdout
    bare = cli(str(spec))
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1
    assert "pipeline and optimize" in bare.stderr and "--policy" in bare.stderr
    broken = _policy(defaults={"pipeline": [{"quantize": {}}], "optimize": {}})
    bad = cli(str(spec), "--policy", str(_write(tmp_path / "bad.yaml", broken)))
    assert bad.returncode == 2 and "at most one of pipeline and optimize" in bad.stderr


# ------------------------------------------------------------------ discovery


def test_discovered_names_are_dns_labels_and_never_collide() -> None:
    from edgeslim.operator.policy_discovery import model_name

    assert model_name("vision/Digits_CNN") == "vision-digits-cnn"
    assert model_name("a") == "a"
    long_a, long_b = "x" * 60 + "/a", "x" * 60 + "/b"
    assert model_name(long_a) != model_name(long_b)
    assert all(len(model_name(n)) <= 52 for n in (long_a, long_b))
    assert model_name("__").startswith("m-")


def test_a_model_file_needs_its_dataset_beside_it() -> None:
    from edgeslim.operator.policy_discovery import pairs

    uris = [
        "s3://models/team-a/cnn.onnx",
        "s3://models/team-a/cnn.val.npz",
        "s3://models/team-a/sub/Big.onnx",
        "s3://models/team-a/sub/Big.val.npz",
        "s3://models/team-a/lonely.onnx",
        "s3://models/team-a/notes.txt",
    ]
    assert pairs("s3://models/team-a", uris, ".val.npz") == [
        ("cnn", "s3://models/team-a/cnn.onnx", "s3://models/team-a/cnn.val.npz"),
        ("sub-big", "s3://models/team-a/sub/Big.onnx", "s3://models/team-a/sub/Big.val.npz"),
    ]


def test_a_discovered_model_is_selected_and_complete() -> None:
    from edgeslim.operator.policy_discovery import model_body

    body = _policy()
    body["spec"]["discover"] = {
        "uri": "s3://models/team-a/",
        "credentialsSecret": "s3-creds",
        "output": {"uri": "s3://models/edge/"},
    }
    entry = policy.policy_entry(body)
    assert entry.policy is not None
    made = model_body(
        entry.policy, "uid-1", "cnn", "s3://models/a/cnn.onnx", "s3://models/a/cnn.val.npz"
    )
    assert made["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert policy.policy_for([entry], made) is entry
    spec = runtime.CompressedModel.model_validate(policy.effective_body(made, entry)).spec
    assert spec.source.credentials_secret == "s3-creds"
    assert spec.evaluation.max_metric_drop == 0.02 and spec.output.uri == "s3://models/edge/"
    without_labels = _policy(selector={"matchExpressions": [{"key": "t", "operator": "Exists"}]})
    without_labels["spec"]["discover"] = body["spec"]["discover"]
    with pytest.raises(ValidationError, match=r"discover: needs selector\.matchLabels"):
        CompressionPolicy.model_validate(without_labels)
