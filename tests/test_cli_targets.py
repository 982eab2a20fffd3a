"""`edgeslim compress --target`: one spec.targets entry compressed locally exactly
as the operator's Job for that target compresses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeslim.api.spec import CompressedModel
from edgeslim.cli import EXIT_BAD_INPUT, EXIT_OK
from tests.test_cli import run, spec_for, written

TARGETS = [
    {"name": "x86", "nodeSelector": {"kubernetes.io/arch": "amd64"}},
    {"name": "accel", "nodeSelector": {"accelerator": "yes"}, "quantize": {"mode": "fp16"}},
]


def two_targets(digits, tmp_path: Path) -> dict:
    doc = spec_for(digits, tmp_path, pipeline=[{"quantize": {"mode": "dynamic"}}])
    doc["spec"]["targets"] = TARGETS
    return doc


def test_a_target_compresses_its_own_recipe_into_its_own_folder(digits, tmp_path: Path) -> None:
    doc = two_targets(digits, tmp_path)
    assert run(doc, tmp_path, "--target", "accel") == EXIT_OK
    [manifest] = [p for p in written(tmp_path) if p.name == "manifest.json"]
    result = json.loads(manifest.read_text())
    accel = CompressedModel.model_validate(doc).spec.for_target("accel")
    assert result["specHash"] == accel.spec_hash()
    assert f"/{accel.spec_hash()}/" in manifest.as_posix()
    [step] = result["steps"]
    assert (step["type"], step["config"]["mode"]) == ("quantize", "fp16")


@pytest.mark.parametrize(
    ("extra", "message"),
    [((), "choose one with --target"), (("--target", "gpu"), "--target gpu: spec.targets names")],
)
def test_which_target_must_be_clear(
    digits, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple, message: str
) -> None:
    assert run(two_targets(digits, tmp_path), tmp_path, *extra) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "x86, accel" in err[0]
    assert written(tmp_path) == []
