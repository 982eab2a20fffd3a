"""Quantizing models from older exporters: opsets 11 and 12 (PaddleOCR and many
third-party files) as well as 13, with weights stored as Constant nodes.

Per-channel QDQ needs DequantizeLinear's `axis` (opset 13); before the fix the
default static int8 spec crashed inside onnxruntime with exit 1 on such files.
The digits CNN is re-exported at each opset and compressed by the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml

from edgeslim.compressor import datasets, evaluate
from tests import cli_process
from tests.archs import digits_build

EXIT_OK, EXIT_REJECTED = 0, 3
MAX_DROP = 0.02


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The trained digits CNN exported at opsets 11, 12 and 13 with Constant-node weights."""
    build = digits_build()
    out = tmp_path_factory.mktemp("opsets")
    paths = {}
    for opset in (11, 12, 13):
        path = out / f"cnn-opset{opset}.onnx"
        build.reexport(digits.model_path, path, opset, constant_weights=True)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == opset and not model.graph.initializer
        paths[opset] = path
    return paths


def _spec(digits, model: Path, tmp_path: Path, quantize: dict) -> Path:
    doc = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "old-exporter"},
        "spec": {
            "source": {"uri": str(model)},
            "evaluation": {
                "dataset": str(digits.val),
                "metric": "accuracy",
                "maxMetricDrop": MAX_DROP,
                "latencyRuns": 5,
            },
            "pipeline": [{"quantize": quantize}],
            "output": {"uri": str(tmp_path / "out")},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _compress(spec: Path) -> tuple[int, dict, Path]:
    """Runs `edgeslim compress` as a user would; returns exit code, manifest and artifact."""
    proc = cli_process.compress(spec)
    assert proc.returncode in (EXIT_OK, EXIT_REJECTED), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    manifest_path = next((spec.parent / "out").rglob("manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    artifact = next(p for p in manifest_path.parent.iterdir() if p.name.startswith("model"))
    return proc.returncode, manifest, artifact


def _check_artifact(digits, artifact: Path, manifest: dict) -> None:
    """The artifact loads in onnxruntime and is as accurate as the manifest says."""
    model = onnx.load(str(artifact))
    data = datasets.load(digits.val, model)
    out = evaluate.run_batched(evaluate.session(model), data)
    accuracy = evaluate.metric(evaluate.Metric.accuracy, out, out, data.labels)
    assert accuracy == pytest.approx(manifest["evaluation"]["compressed"], abs=1e-6)
    assert manifest["evaluation"]["drop"] <= MAX_DROP


@pytest.mark.parametrize("opset", [11, 12, 13])
def test_static_per_channel_int8_works_at_every_opset(
    digits, exported: dict[int, Path], tmp_path: Path, opset: int
) -> None:
    spec = _spec(digits, exported[opset], tmp_path, {"mode": "static", "calibrationSamples": 64})
    code, manifest, artifact = _compress(spec)
    assert code == EXIT_OK
    _check_artifact(digits, artifact, manifest)
    notes = manifest["steps"][0]["notes"]
    if opset < 13:
        assert any(f"opset {opset} upgraded to 13 for per-channel int8" in n for n in notes), notes
        assert onnx.load(str(artifact)).opset_import[0].version >= 13
    else:
        assert not any("upgraded" in n or "per-tensor" in n for n in notes), notes
    # Per-channel really happened: the weights' DequantizeLinear carry an axis.
    dq = [n for n in onnx.load(str(artifact)).graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "axis" for n in dq for a in n.attribute)


@pytest.mark.parametrize("mode", ["dynamic", "fp16"])
def test_dynamic_and_fp16_work_at_opset_11(
    digits, exported: dict[int, Path], tmp_path: Path, mode: str
) -> None:
    code, manifest, artifact = _compress(_spec(digits, exported[11], tmp_path, {"mode": mode}))
    assert code == EXIT_OK
    _check_artifact(digits, artifact, manifest)


def test_a_model_the_converter_cannot_upgrade_is_quantized_per_tensor(
    digits, exported: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnx's converter handles every opset-11 graph we could export, so its
    # failure on some third-party file is simulated; the rest is the real CLI.
    from onnx import version_converter

    from edgeslim.cli import main

    def refuse(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("No Adapter For Current Version")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    spec = _spec(digits, exported[11], tmp_path, {"mode": "static", "calibrationSamples": 64})
    assert main(["compress", str(spec), "--quiet"]) == EXIT_OK
    manifest_path = next((tmp_path / "out").rglob("manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    notes = manifest["steps"][0]["notes"]
    assert any("per-tensor int8 instead of per-channel" in n and "RuntimeError" in n for n in notes)
    artifact = manifest_path.parent / "model.onnx"
    _check_artifact(digits, artifact, manifest)
    model = onnx.load(str(artifact))
    assert model.opset_import[0].version == 11
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and not any(a.name == "axis" for n in dq for a in n.attribute)
