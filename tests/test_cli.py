"""`edgeslim compress` end to end on the digits model: the gate, the output, the exit codes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto

from edgeslim import storage
from edgeslim.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_REJECTED, main
from edgeslim.compressor import datasets, evaluate
from tests.results import expected_prefix

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits" / "digits.yaml"


def spec_for(digits, tmp_path: Path, pipeline: list | None = None, **spec_updates) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["source"]["uri"] = str(digits.model_path)
    spec["evaluation"]["dataset"] = str(digits.val)
    spec["evaluation"]["latencyRuns"] = 20
    spec["output"]["uri"] = str(tmp_path / "out")
    for step in spec["pipeline"]:
        if "distill" in step:
            step["distill"].update(dataset=str(digits.train))
    if pipeline is not None:
        spec["pipeline"] = pipeline
    spec.update(spec_updates)
    return doc


def run(doc: dict, tmp_path: Path, *extra: str) -> int:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return main(["compress", str(path), "--quiet", *extra])


def written(tmp_path: Path) -> list[Path]:
    out = tmp_path / "out"
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


@pytest.mark.slow
def test_demo_spec_passes_the_gate_and_writes_a_content_addressed_result(
    digits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("EDGESLIM_TERMINATION_LOG", str(term))
    doc = spec_for(digits, tmp_path)
    assert run(doc, tmp_path) == EXIT_OK

    from edgeslim.api.spec import CompressedModel

    spec_hash = CompressedModel.model_validate(doc).spec.spec_hash()
    # CLI: namespace "default"; the last folder is named by the inputs' content.
    folder = Path(expected_prefix(doc, str(tmp_path / "out")))
    assert folder.parent.name == spec_hash
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "CompressionResult" and manifest["specHash"] == spec_hash
    assert manifest["gate"]["passed"] is True
    assert manifest["artifact"]["sha256"] == storage.sha256_file(folder / "model.onnx")
    assert manifest["source"]["sha256"] == storage.sha256_file(digits.model_path)
    assert [s["type"] for s in manifest["steps"]] == ["simplify", "prune", "distill", "quantize"]
    assert manifest["downloadRatio"] >= 10, manifest["downloadRatio"]
    assert manifest["compressionRatio"] == pytest.approx(
        manifest["source"]["sizeBytes"] / manifest["artifact"]["sizeBytes"], rel=1e-3
    )
    assert manifest["evaluation"]["drop"] <= 0.01
    assert manifest["memory"]["compressedPeakRssBytes"] > 10_000_000  # a real process was measured
    assert set(manifest["versions"]) >= {"edgeslim", "torch", "onnx", "onnxruntime"}

    prune = manifest["steps"][1]
    assert (
        prune["after"]["parameters"] < prune["before"]["parameters"] / 3
    )  # channels really removed
    model = onnx.load(str(folder / "model.onnx"))
    assert TensorProto.INT8 in {t.data_type for t in model.graph.initializer}
    # The artifact itself is as accurate as the manifest says.
    data = datasets.load(digits.val, model)
    out = evaluate.run_batched(evaluate.session(model), data)
    assert evaluate.metric(evaluate.Metric.accuracy, out, out, data.labels) == pytest.approx(
        manifest["evaluation"]["compressed"], abs=1e-6
    )

    summary = json.loads(term.read_text())
    assert len(term.read_bytes()) <= 4096
    assert summary["specHash"] == spec_hash and summary["gate"]["passed"] is True
    assert summary["artifact"]["sha256"] == manifest["artifact"]["sha256"]


def test_a_spec_that_destroys_accuracy_is_rejected_and_kept_marked(digits, tmp_path: Path) -> None:
    doc = spec_for(
        digits, tmp_path, pipeline=[{"prune": {"method": "magnitude", "sparsity": 0.995}}]
    )
    assert run(doc, tmp_path) == EXIT_REJECTED
    names = [p.name for p in written(tmp_path)]
    assert names == ["manifest.json", "model.rejected.onnx"]  # no model.onnx for anything to deploy
    manifest = json.loads(
        next(p for p in written(tmp_path) if p.name == "manifest.json").read_text()
    )
    assert manifest["gate"]["passed"] is False and "rejected" in manifest["gate"]["reason"]
    assert manifest["evaluation"]["drop"] > 0.01
    assert manifest["artifact"]["sparsity"] >= 0.99


def test_a_step_that_changes_nothing_says_so(digits, tmp_path: Path) -> None:
    doc = spec_for(digits, tmp_path, pipeline=[{"prune": {"method": "magnitude", "sparsity": 0.0}}])
    assert run(doc, tmp_path) == EXIT_OK
    manifest = json.loads(
        next(p for p in written(tmp_path) if p.name == "manifest.json").read_text()
    )
    assert manifest["steps"][0]["changed"] is False
    assert manifest["compressionRatio"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_s3_source_and_output_over_http(digits, tmp_path: Path, s3: str) -> None:
    for name, path in (("cnn.onnx", digits.model_path), ("val.npz", digits.val)):
        storage.put_file(path, f"s3://{s3}/inputs/{name}")
    doc = spec_for(digits, tmp_path, pipeline=[{"quantize": {"mode": "dynamic"}}])
    doc["spec"]["source"] = {
        "uri": f"s3://{s3}/inputs/cnn.onnx",
        "sha256": storage.sha256_file(digits.model_path),
    }
    doc["spec"]["evaluation"]["dataset"] = f"s3://{s3}/inputs/val.npz"
    doc["spec"]["output"]["uri"] = f"s3://{s3}/edge/"
    assert run(doc, tmp_path) == EXIT_OK
    from edgeslim.api.spec import CompressedModel

    spec_hash = CompressedModel.model_validate(doc).spec.spec_hash()
    prefix = expected_prefix(doc, f"s3://{s3}/edge/")
    assert prefix.startswith(f"s3://{s3}/edge/default/digits-cnn/{spec_hash}/")
    manifest = json.loads(storage.read_bytes(f"{prefix}manifest.json"))
    model = storage.read_bytes(manifest["artifact"]["uri"])
    assert manifest["artifact"]["uri"] == f"{prefix}model.onnx"
    import hashlib

    assert hashlib.sha256(model).hexdigest() == manifest["artifact"]["sha256"]


def _bad_dataset(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.npz"
    np.savez(path, x=np.zeros((10, 64), np.float32), y=np.zeros(10, np.int64))  # flat, not 1x8x8
    return path


def _pickled(tmp_path: Path) -> Path:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    return path


def _corrupt(tmp_path: Path, digits) -> Path:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07" + digits.model_path.read_bytes()[100:3000])
    return path


BAD_INPUTS = {
    "missing source": (
        lambda d, t, g: d["spec"]["source"].update(uri=str(t / "nope.onnx")),
        "source model",
    ),
    "unreachable source": (
        lambda d, t, g: d["spec"]["source"].update(uri="s3://no-such-bucket/m.onnx"),
        "source model s3://no-such-bucket/m.onnx",
    ),
    "wrong sha256": (
        lambda d, t, g: d["spec"]["source"].update(sha256="0" * 64),
        "sha256 mismatch",
    ),
    "corrupt onnx": (lambda d, t, g: d["spec"]["source"].update(uri=str(_corrupt(t, g))), "ONNX"),
    "pickled checkpoint": (
        lambda d, t, g: d["spec"]["source"].update(uri=str(_pickled(t))),
        "unpickling runs arbitrary code",
    ),
    "unknown step": (
        lambda d, t, g: d["spec"]["pipeline"].append({"sharpen": {}}),
        "unknown step 'sharpen'",
    ),
    "sparsity 1.0": (
        lambda d, t, g: d["spec"]["pipeline"][1]["prune"].update(sparsity=1.0),
        "prune.sparsity: Input should be less than 1",
    ),
    "negative sparsity": (
        lambda d, t, g: d["spec"]["pipeline"][1]["prune"].update(sparsity=-0.5),
        "prune.sparsity",
    ),
    "dataset does not fit": (
        lambda d, t, g: d["spec"]["evaluation"].update(dataset=str(_bad_dataset(t))),
        "input 'input' has shape [10, 64], the model expects input[batch, 1, 8, 8]",
    ),
    "distill dataset does not fit": (
        lambda d, t, g: d["spec"]["pipeline"][2]["distill"].update(dataset=str(_bad_dataset(t))),
        "pipeline[2].distill.dataset",
    ),
    "quantize twice": (
        lambda d, t, g: d["spec"]["pipeline"].append({"quantize": {"mode": "fp16"}}),
        "quantize may appear at most once",
    ),
    "empty pipeline": (lambda d, t, g: d["spec"].update(pipeline=[]), "spec.pipeline"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case: str,
    digits,
    tmp_path: Path,
    s3: str,
    capsys: pytest.CaptureFixture,
) -> None:
    mutate, expected = BAD_INPUTS[case]
    doc = spec_for(digits, tmp_path)
    mutate(doc, tmp_path, digits)
    assert run(doc, tmp_path) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.startswith("edgeslim: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert written(tmp_path) == []


def test_validate_prints_the_spec_hash(
    digits, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_for(digits, tmp_path)))
    assert main(["validate", str(path)]) == EXIT_OK
    assert "valid, spec hash" in capsys.readouterr().out


class _TinyEncoder(torch.nn.Module):
    """A transformer-shaped model: token + mask inputs, embedding, attention-like mixing."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.emb(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def test_multi_input_model_runs_the_whole_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(96, 12)).astype(np.int64)
    mask = (rng.random((96, 12)) > 0.2).astype(np.int64)
    model_path = tmp_path / "encoder.onnx"
    torch.onnx.export(
        _TinyEncoder().eval(),
        (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
        str(model_path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}, "logits": {0: "b"}},
        opset_version=17,
        dynamo=False,
    )
    np.savez(tmp_path / "text.npz", input_ids=ids, attention_mask=mask)
    doc = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "encoder"},
        "spec": {
            "source": {"uri": str(model_path)},
            "evaluation": {
                "dataset": str(tmp_path / "text.npz"),
                "metric": "cosine",
                "maxMetricDrop": 0.05,
                "latencyRuns": 10,
            },
            "pipeline": [
                {"prune": {"method": "magnitude", "sparsity": 0.3}},
                {"distill": {"dataset": str(tmp_path / "text.npz"), "epochs": 2}},
                {"quantize": {"mode": "dynamic"}},
            ],
            "output": {"uri": str(tmp_path / "out")},
        },
    }
    assert run(doc, tmp_path) == EXIT_OK
    manifest = json.loads(
        next(p for p in written(tmp_path) if p.name == "manifest.json").read_text()
    )
    assert manifest["evaluation"]["metric"] == "cosine" and manifest["evaluation"]["samples"] == 96
    assert manifest["evaluation"]["compressed"] > 0.95
    assert [s["changed"] for s in manifest["steps"]] == [True, True, True]


def test_a_stored_result_is_reused_and_a_damaged_one_recomputed(digits, tmp_path: Path) -> None:
    doc = spec_for(digits, tmp_path, pipeline=[{"quantize": {"mode": "dynamic"}}])
    assert run(doc, tmp_path) == EXIT_OK
    model = next(p for p in written(tmp_path) if p.name == "model.onnx")
    manifest = json.loads((model.parent / "manifest.json").read_text())
    first = model.stat().st_ino

    # A rerun (or a retried Job) finds the complete result and leaves it alone.
    assert run(doc, tmp_path) == EXIT_OK
    assert model.stat().st_ino == first

    # Bytes that no longer match the manifest are not trusted: computed again.
    model.write_bytes(b"not the artifact")
    assert run(doc, tmp_path) == EXIT_OK
    assert storage.sha256_file(model) == manifest["artifact"]["sha256"]
    second = model.stat().st_ino
    assert second != first

    # --force recomputes even an intact result.
    assert run(doc, tmp_path, "--force") == EXIT_OK
    assert model.stat().st_ino != second


def test_a_missing_workdir_is_a_usage_error(
    digits, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_for(digits, tmp_path)))
    with pytest.raises(SystemExit) as exited:
        main(["compress", str(path), "--workdir", str(tmp_path / "missing")])
    assert exited.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--workdir" in err and "is not an existing folder" in err and "Traceback" not in err
    assert written(tmp_path) == []


def test_a_quantize_only_compress_never_loads_torch(digits, tmp_path: Path) -> None:
    """torch is for pruning and distillation: importing it costs a compressor pod about
    500 MB, so a run that only simplifies and quantizes must not (onnxruntime's tools
    package imports it whenever it is installed; the manifest's version comes from the
    package metadata)."""
    import subprocess
    import sys

    doc = spec_for(
        digits,
        tmp_path,
        pipeline=[{"simplify": {}}, {"quantize": {"mode": "static", "calibrationSamples": 64}}],
    )
    doc["spec"]["evaluation"]["latencyRuns"] = 5
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    probe = (
        "import sys; from edgeslim.cli import main; "
        f"code = main(['compress', {str(path)!r}, '--quiet']); "
        "print('torch' in sys.modules, code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.stdout.split()[-2:] == ["False", str(EXIT_OK)], done.stdout + done.stderr
    (manifest,) = (p for p in written(tmp_path) if p.name == "manifest.json")
    result = json.loads(manifest.read_text())
    assert result["versions"]["torch"] == torch.__version__.split("+")[0]
    notes = [n for step in result["steps"] for n in step.get("notes", [])]
    assert not any("pre-processing skipped" in n for n in notes), notes
