"""deployment.split in the compressor: `edgeslim compress` (a real subprocess) stores the
artifact's parts beside it, checked against it, with their sha256 in the manifest and
the termination message."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from edgeslim.api.result import CompressionResult
from edgeslim.api.spec import CompressedModelSpec
from edgeslim.api.split import SplitPlan
from edgeslim.api.termination import TerminationMessage
from edgeslim.compressor import split as sp
from tests.cli_process import compress


def _spec(digits, out: Path, split: dict) -> dict:
    return {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "digits-split"},
        "spec": {
            "source": {"uri": str(digits.model_path)},
            "evaluation": {
                "dataset": str(digits.val),
                "metric": "accuracy",
                "maxMetricDrop": 0.05,
                "samples": 64,
                "latencyRuns": 5,
            },
            "pipeline": [{"simplify": {}}, {"quantize": {"mode": "dynamic"}}],
            "output": {"uri": str(out)},
            "deployment": {"split": split},
        },
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_split_spec_stores_checked_parts_beside_the_artifact(digits, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(digits, tmp_path / "out", {"parts": 2})))
    term = tmp_path / "termination-log"
    proc = compress(spec, env={"EDGESLIM_TERMINATION_LOG": str(term)})
    assert proc.returncode == 0, proc.stderr

    (manifest_path,) = (tmp_path / "out").rglob("manifest.json")
    folder = manifest_path.parent
    result = CompressionResult.model_validate_json(manifest_path.read_text())
    assert result.gate.passed and result.split is not None
    assert sorted(p.name for p in (folder / "parts").iterdir()) == [
        "part-0.onnx",
        "part-1.onnx",
        "split.json",
    ]
    for i, entry in enumerate(result.split.parts):
        path = folder / "parts" / f"part-{i}.onnx"
        assert Path(entry.uri) == path
        assert entry.sha256 == _sha(path) and entry.size_bytes == path.stat().st_size
    assert result.split.plan.sha256 == _sha(folder / "parts" / "split.json")
    assert result.split.max_abs_diff <= result.split.tolerance == 1e-4
    assert result.split.samples == 64

    plan = SplitPlan.model_validate_json((folder / "parts" / "split.json").read_text())
    assert plan.source.sha256 == result.artifact.sha256 == _sha(folder / "model.onnx")
    assert [p.sha256 for p in plan.parts] == [p.sha256 for p in result.split.parts]
    assert plan.check is not None and plan.check.passed and plan.check.source == "evaluation"

    # The operator pins every part from the termination message alone.
    message = TerminationMessage.parse(term.read_text())
    assert message.parts == [p.sha256 for p in result.split.parts]

    # The stored parts, chained, answer as the stored artifact does.
    whole = ort.InferenceSession(str(folder / "model.onnx"))
    chain = [ort.InferenceSession(str(folder / "parts" / f"part-{i}.onnx")) for i in range(2)]
    x = np.load(digits.val)
    feed = {whole.get_inputs()[0].name: x["x"][:16].astype(np.float32)}
    expected = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feed), strict=True))
    assert sp.max_abs_diff(expected, sp.run_chain(chain, feed)) <= 1e-4


def test_the_split_is_part_of_the_spec_hash_but_its_placement_is_not(digits) -> None:
    base = _spec(digits, Path("/tmp/out"), {"parts": 2})["spec"]
    plain = CompressedModelSpec.model_validate({**base, "deployment": {}})
    two = CompressedModelSpec.model_validate(base)
    three = CompressedModelSpec.model_validate({**base, "deployment": {"split": {"parts": 3}}})
    placed = CompressedModelSpec.model_validate(
        {
            **base,
            "deployment": {"split": {"parts": 2, "placement": [{"nodeSelector": {"edge": "a"}}]}},
        }
    )
    assert len({plain.spec_hash(), two.spec_hash(), three.spec_hash()}) == 3
    assert placed.spec_hash() == two.spec_hash()


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        ({"split": {}}, "give parts, maxPartBytes or both"),
        ({"split": {"parts": 1}}, "greater than or equal to 2"),
        ({"split": {"parts": 9}}, "less than or equal to 8"),
        ({"split": {"parts": 2, "placement": [{}, {}, {}]}}, "3 entries for 2 parts"),
        ({"split": {"parts": 2}, "canary": {}}, "not with deployment.canary"),
    ],
)
def test_split_combinations_that_are_refused(digits, deployment: dict, message: str) -> None:
    base = _spec(digits, Path("/tmp/out"), {"parts": 2})["spec"]
    with pytest.raises(ValueError, match=message):
        CompressedModelSpec.model_validate({**base, "deployment": deployment})


def test_split_with_targets_is_refused(digits) -> None:
    base = _spec(digits, Path("/tmp/out"), {"parts": 2})["spec"]
    with pytest.raises(ValueError, match=r"not with spec\.targets"):
        CompressedModelSpec.model_validate({**base, "targets": [{"name": "arm64"}]})


def test_a_split_the_model_cannot_take_fails_with_exit_2(digits, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(digits, tmp_path / "out", {"maxPartBytes": 16})))
    proc = compress(spec)
    assert proc.returncode == 2, proc.stderr
    assert "deployment.split: no split into 8 parts or fewer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_termination_message_keeps_the_parts_when_figures_are_dropped(digits) -> None:
    shas = ["a" * 64] * 8
    msg = TerminationMessage(
        name="m",
        spec_hash="0" * 16,
        gate={"passed": True, "maxMetricDrop": 0.1, "reason": "ok"},
        parts=shas,
    )
    assert json.loads(msg.fitted(900).text())["parts"] == shas
