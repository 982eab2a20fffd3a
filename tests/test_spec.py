"""The CompressedModel models: what they accept, what they refuse and how they say it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from edgeslim.api.errors import format_validation_error
from edgeslim.api.spec import CompressedModel

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits" / "digits.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def error_of(doc: dict) -> str:
    with pytest.raises(ValidationError) as info:
        CompressedModel.model_validate(doc)
    return format_validation_error(info.value)


def test_example_parses_with_defaults_filled_in() -> None:
    obj = CompressedModel.model_validate(example())
    assert obj.metadata.name == "digits-cnn"
    assert [s.type for s in obj.spec.pipeline] == ["simplify", "prune", "distill", "quantize"]
    prune = obj.spec.pipeline[1].prune
    assert (
        prune.sparsity == 0.5
        and prune.method.value == "structured"
        and prune.criterion.value == "l1"
    )
    quantize = obj.spec.pipeline[3].quantize
    assert quantize.per_channel is True and quantize.op_types == ["Conv", "Gemm", "MatMul"]
    assert obj.spec.evaluation.max_metric_drop == 0.01


def test_wire_form_round_trips_in_camel_case() -> None:
    obj = CompressedModel.model_validate(example())
    wire = obj.spec.wire()
    assert wire["pipeline"][3]["quantize"]["calibrationSamples"] == 256
    assert wire["evaluation"]["maxMetricDrop"] == 0.01
    again = CompressedModel.model_validate({**example(), "spec": wire})
    assert again.spec == obj.spec


def test_spec_hash_is_stable_and_tracks_what_changes_the_artifact() -> None:
    base = CompressedModel.model_validate(example()).spec
    doc = example()
    doc["spec"]["deployment"] = {"replicas": 5}
    with_deploy = CompressedModel.model_validate(doc).spec
    assert (
        with_deploy.spec_hash() == base.spec_hash()
    )  # rolling out more replicas recompresses nothing
    doc["spec"]["pipeline"][1]["prune"]["sparsity"] = 0.6
    assert CompressedModel.model_validate(doc).spec.spec_hash() != base.spec_hash()
    assert len(base.spec_hash()) == 16


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["spec"].update(pipeline=[]),
            "spec.pipeline: List should have at least 1 item",
        ),
        (lambda d: d["spec"]["pipeline"].append({"shrink": {}}), "unknown step 'shrink'"),
        (
            lambda d: d["spec"]["pipeline"][1]["prune"].update(sparsity=1.0),
            "spec.pipeline[1].prune.sparsity: Input should be less than 1",
        ),
        (
            lambda d: d["spec"]["pipeline"][1]["prune"].update(sparsity=-0.1),
            "spec.pipeline[1].prune.sparsity: Input should be greater than or equal to 0",
        ),
        (
            lambda d: d["spec"]["pipeline"].append({"quantize": {"mode": "fp16"}}),
            "quantize may appear at most once",
        ),
        (
            lambda d: d["spec"]["pipeline"].append({"prune": {"sparsity": 0.2}}),
            "prune and distill cannot follow quantize",
        ),
        (
            lambda d: d["spec"]["pipeline"][1]["prune"].update(method="random"),
            "spec.pipeline[1].prune.method: Input should be 'magnitude' or 'structured'",
        ),
        (
            lambda d: d["spec"]["pipeline"][1]["prune"].update(sparsty=0.5),
            "spec.pipeline[1].prune.sparsty: Extra inputs are not permitted",
        ),
        (
            lambda d: d["spec"]["source"].update(sha256="abc"),
            "spec.source.sha256: String should match",
        ),
        (
            lambda d: d["spec"]["evaluation"].update(metric="f1"),
            "spec.evaluation.metric: Input should be",
        ),
        (
            lambda d: d["spec"]["pipeline"].insert(0, {"prune": {"sparsity": 0.1}, "simplify": {}}),
            "a step has exactly one key",
        ),
        (lambda d: d.update(kind="Model"), "kind: Input should be 'CompressedModel'"),
        (lambda d: d["metadata"].update(name="Digits_CNN"), "metadata.name: String should match"),
        (
            lambda d: (d["spec"].pop("output"), d["spec"].update(deployment={"replicas": 1})),
            "a deployment needs an output location",
        ),
    ],
)
def test_bad_specs_name_the_field(mutate, expected: str) -> None:
    doc = copy.deepcopy(example())
    mutate(doc)
    assert expected in error_of(doc)


def test_step_shorthand_and_empty_config() -> None:
    doc = example()
    doc["spec"]["pipeline"] = ["simplify", {"quantize": None}]
    obj = CompressedModel.model_validate(doc)
    assert [s.type for s in obj.spec.pipeline] == ["simplify", "quantize"]
    assert obj.spec.pipeline[1].quantize.mode.value == "static"
