"""deployment.split in the operator without a cluster: the part Deployments and Services,
their names, and the chain read as one rollout."""

from __future__ import annotations

import copy

from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import PartArtifact, ServedArtifact
from edgeslim.api.termination import TerminationMessage
from edgeslim.operator import results, serving, status
from edgeslim.operator.names import (
    APPLIED_HASH_ANNOTATION,
    MODEL_LABEL,
    PART_LABEL,
    part_serving_name,
)
from edgeslim.operator.settings import Settings
from edgeslim.operator.split_serving import (
    NEXT_PART_ENV,
    build_part_deployment,
    build_part_service,
    chain_state,
)

UID = "0f0e0d0c-0000-4000-8000-000000000001"
PREFIX = "s3://models/edge/vision/bert/abc/def"
SHA = "a" * 64


def model(split: dict, **deployment: object) -> CompressedModel:
    return CompressedModel.model_validate(
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": "bert", "namespace": "nlp", "uid": UID, "generation": 2},
            "spec": {
                "source": {"uri": "s3://models/bert.onnx"},
                "evaluation": {"dataset": "s3://data/val.npz", "maxMetricDrop": 0.02},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
                "output": {"uri": "s3://models/edge/"},
                "deployment": {"replicas": 2, "split": split, **deployment},
            },
        }
    )


def artifact(parts: int, sha: str = SHA) -> ServedArtifact:
    return ServedArtifact(
        uri=f"{PREFIX}/model.onnx",
        sha256=sha,
        parts=[
            PartArtifact(uri=f"{PREFIX}/parts/part-{i}.onnx", sha256=f"{i}" * 64)
            for i in range(parts)
        ],
    )


def _container(d: dict) -> dict:
    return d["spec"]["template"]["spec"]["containers"][0]


def _arg(d: dict, flag: str) -> str:
    cmd = _container(d)["command"]
    return cmd[cmd.index(flag) + 1]


def test_each_part_runs_its_pinned_file_and_forwards_to_the_next_service() -> None:
    m = model(
        {
            "parts": 3,
            "placement": [
                {"nodeSelector": {"edge/class": "small"}},
                {
                    "nodeSelector": {"edge/class": "big"},
                    "tolerations": [{"key": "big", "operator": "Exists"}],
                },
            ],
        },
        nodeSelector={"role": "edge"},
    )
    art = artifact(3)
    deps = [build_part_deployment(m, art, i, Settings()) for i in range(3)]
    assert [d["metadata"]["name"] for d in deps] == ["bert-part-0", "bert-part-1", "bert-part-2"]
    for i, d in enumerate(deps):
        assert d["metadata"]["ownerReferences"][0]["uid"] == UID
        assert d["metadata"]["labels"][PART_LABEL] == str(i)
        assert d["spec"]["selector"]["matchLabels"] == {
            MODEL_LABEL: "bert",
            "app.kubernetes.io/component": "serving",
            PART_LABEL: str(i),
        }
        assert d["spec"]["replicas"] == 2
        assert _arg(d, "--model") == f"{PREFIX}/parts/part-{i}.onnx"
        assert _arg(d, "--sha256") == f"{i}" * 64
        # The whole artifact's identity stays on every part: the rollout reads it.
        assert serving.rollout_state(d).artifact.sha256 == SHA
    env = [{e["name"]: e.get("value") for e in _container(d)["env"]} for d in deps]
    assert env[0][NEXT_PART_ENV] == "http://bert-part-1.nlp.svc:8080/v2/models/bert"
    assert env[1][NEXT_PART_ENV] == "http://bert-part-2.nlp.svc:8080/v2/models/bert"
    assert NEXT_PART_ENV not in env[2]
    pods = [d["spec"]["template"]["spec"] for d in deps]
    assert pods[0]["nodeSelector"] == {"role": "edge", "edge/class": "small"}
    assert pods[1]["nodeSelector"] == {"role": "edge", "edge/class": "big"}
    assert pods[1]["tolerations"] == [{"key": "big", "operator": "Exists"}]
    assert pods[2]["nodeSelector"] == {"role": "edge"} and "tolerations" not in pods[2]


def test_part_manifests_are_deterministic_and_change_with_the_artifact() -> None:
    m = model({"parts": 2})
    a = build_part_deployment(m, artifact(2), 0, Settings())
    assert a == build_part_deployment(m, artifact(2), 0, Settings())
    b = build_part_deployment(m, artifact(2, "b" * 64), 0, Settings())
    key = APPLIED_HASH_ANNOTATION
    assert a["metadata"]["annotations"][key] != b["metadata"]["annotations"][key]


def test_part_service_selects_only_its_part() -> None:
    s = build_part_service(model({"parts": 2}), 1)
    assert s["metadata"]["name"] == "bert-part-1"
    assert s["spec"]["selector"][PART_LABEL] == "1"
    assert s["spec"]["ports"][0]["port"] == 8080
    assert s["metadata"]["ownerReferences"][0]["uid"] == UID


def test_part_names_fit_63_characters_and_stay_apart() -> None:
    long_a, long_b = "a" * 60 + "xyz", "a" * 60 + "xyw"
    names = {part_serving_name(n, i) for n in (long_a, long_b) for i in range(8)}
    assert len(names) == 16 and all(len(n) <= 63 for n in names)
    assert part_serving_name("7up", 0) == "m-7up-part-0"


def _done(d: dict) -> dict:
    d = copy.deepcopy(d)
    d["metadata"]["generation"] = 1
    n = d["spec"]["replicas"]
    d["status"] = {
        "observedGeneration": 1,
        "replicas": n,
        "updatedReplicas": n,
        "readyReplicas": n,
        "availableReplicas": n,
    }
    return d


def _stuck(d: dict, ready: int = 0) -> dict:
    d = _done(d)
    d["status"] |= {"readyReplicas": ready, "availableReplicas": ready}
    d["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    ]
    return d


def test_the_chain_is_complete_only_when_every_part_is() -> None:
    m = model({"parts": 2})
    deps = [build_part_deployment(m, artifact(2), i, Settings()) for i in range(2)]
    assert chain_state([None, None]).rollout is serving.Rollout.absent
    state = chain_state([_done(deps[0]), _done(deps[1])])
    assert state.rollout is serving.Rollout.complete
    assert state.artifact == artifact(2)  # parts read back from the templates
    assert state.ready_replicas == 2
    assert chain_state([_done(deps[0]), None]).rollout is serving.Rollout.progressing
    half = _done(deps[1])
    half["status"]["readyReplicas"] = 1
    half["status"]["availableReplicas"] = 1
    partial = chain_state([_done(deps[0]), half])
    assert partial.rollout is serving.Rollout.progressing and partial.ready_replicas == 1
    # Two artifacts in one chain is a rollout under way, never complete.
    other = build_part_deployment(m, artifact(2, "b" * 64), 1, Settings())
    assert chain_state([_done(deps[0]), _done(other)]).rollout is serving.Rollout.progressing


def test_a_part_that_gave_up_fails_the_chain_with_its_artifact() -> None:
    m = model({"parts": 2})
    old = [build_part_deployment(m, artifact(2), i, Settings()) for i in range(2)]
    new = build_part_deployment(m, artifact(2, "b" * 64), 1, Settings())
    state = chain_state([_done(old[0]), _stuck(new)])
    assert state.rollout is serving.Rollout.failed
    assert state.artifact is not None and state.artifact.sha256 == "b" * 64


def test_the_termination_message_parts_become_status_parts() -> None:
    msg = TerminationMessage.model_validate(
        {
            "name": "bert",
            "specHash": "0" * 16,
            "gate": {"passed": True, "maxMetricDrop": 0.02, "reason": "ok"},
            "artifact": {"uri": f"{PREFIX}/model.onnx", "sha256": SHA, "sizeBytes": 10},
            "parts": ["0" * 64, "1" * 64],
        }
    )
    st = results.artifact_status(msg)
    assert st is not None and st.parts == artifact(2).parts


def test_a_part_that_gave_up_rolls_the_whole_chain_back_to_the_last_good_parts() -> None:
    m = model({"parts": 2})
    good, new = artifact(2), artifact(2, "b" * 64)
    new = new.model_copy(
        update={"parts": [p.model_copy(update={"sha256": "c" * 64}) for p in new.parts or []]}
    )
    spec_hash = m.spec.spec_hash()
    cur = status.parse(
        {
            "phase": "Deploying",
            "specHash": spec_hash,
            "artifact": {**new.wire(), "sizeBytes": 1},
            "conditions": [
                {
                    "type": "GatePassed",
                    "status": "True",
                    "reason": "WithinMaxMetricDrop",
                    "lastTransitionTime": "2024-01-01T00:00:00Z",
                }
            ],
            "lastGoodArtifact": good.wire(),
        }
    )
    # Part 1 got the new artifact and gave up; part 0 still runs the old one.
    deps = [
        _done(build_part_deployment(m, good, 0, Settings())),
        _stuck(build_part_deployment(m, new, 1, Settings())),
    ]
    p = serving.plan(cur, spec_hash, chain_state(deps))
    assert p.reason == "RollingBack" and p.failed[-1].sha256 == new.sha256
    assert p.target == good  # with its parts: every part Deployment goes back
    back = [build_part_deployment(m, good, i, Settings()) for i in range(2)]
    assert _arg(back[1], "--sha256") == "1" * 64
    # Once every part runs the last good artifact again: RolledBack, Failed.
    after = status.parse(serving.apply_plan(cur, 2, p, "2024-01-01T00:00:01Z"))
    q = serving.plan(after, spec_hash, chain_state([_done(d) for d in back]))
    assert (q.reason, q.phase.value) == ("RolledBack", "Failed")
