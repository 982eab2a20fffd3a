"""The termination message, the one contract between the compressor Job and the
operator: it always fits the kubelet's 4096 bytes, the operator parses what the
real CLI writes, and whatever a manifest adds is held to the message's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgeslim import storage
from edgeslim.api.result import (
    CompressionResult,
    EvaluationFigures,
    GateVerdict,
    LatencyFigures,
    MemoryFigures,
    ModelFigures,
)
from edgeslim.api.spec import CompressedModel
from edgeslim.api.termination import TERMINATION_MESSAGE_LIMIT, TerminationMessage
from edgeslim.operator import jobs, results
from edgeslim.operator.names import job_name
from tests import cli_process

UID = "0f0e0d0c-0000-4000-8000-000000000001"


def model(output: str = "s3://models/edge/", namespace: str = "vision") -> CompressedModel:
    return CompressedModel.model_validate(
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": "digits-cnn", "namespace": namespace, "uid": UID},
            "spec": {
                "source": {"uri": "s3://models/digits/cnn.onnx"},
                "evaluation": {"dataset": "s3://datasets/digits/val.npz", "maxMetricDrop": 0.02},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
                "output": {"uri": output},
            },
        }
    )


def job_of(m: CompressedModel) -> jobs.JobRef:
    h = m.spec.spec_hash()
    ns = m.metadata.namespace or "default"
    return jobs.JobRef(ns, job_name(m.metadata.name, h), "job-uid", m.metadata.name, h, UID)


def prefix_of(m: CompressedModel) -> str:
    return storage.result_prefix(
        m.spec.output.uri, m.metadata.namespace, m.metadata.name, m.spec.spec_hash()
    )


def figures(uri: str = "") -> ModelFigures:
    return ModelFigures(uri=uri, sha256="a" * 64, size_bytes=10, gzip_size_bytes=9, parameters=3)


def compression_result(m: CompressedModel, **over: object) -> CompressionResult:
    """A manifest as the compressor writes it for `m` (fields replaced by `over`)."""
    return CompressionResult(
        name=m.metadata.name,
        namespace=m.metadata.namespace,
        spec_hash=m.spec.spec_hash(),
        source=figures(m.spec.source.uri),
        artifact=figures(storage.join(prefix_of(m), "model.onnx")),
        steps=[],
        evaluation=EvaluationFigures(
            metric="accuracy", samples=9, baseline=0.9, compressed=0.89, drop=0.01
        ),
        latency=LatencyFigures(
            source_p50_ms=0.2,
            source_p95_ms=0.3,
            compressed_p50_ms=0.1,
            compressed_p95_ms=0.2,
            speedup=2.0,
            slower=False,
        ),
        memory=MemoryFigures(source_peak_rss_bytes=1, compressed_peak_rss_bytes=1),
        compression_ratio=3.91234567,
        download_ratio=4.2,
        gate=GateVerdict(passed=True, max_metric_drop=0.02, reason="within maxMetricDrop"),
        versions={"edgeslim": "test"},
    ).model_copy(update=over)


# ----------------------------------------------------------------- the message


def test_a_result_that_fits_is_written_whole_and_reads_back_the_same() -> None:
    m = model()
    manifest_uri = storage.join(prefix_of(m), "manifest.json")
    msg = TerminationMessage.from_result(compression_result(m), manifest_uri)
    assert msg.complete and msg.namespace == "vision" and msg.compression_ratio == 3.9123
    assert msg.size() <= TERMINATION_MESSAGE_LIMIT
    assert TerminationMessage.parse(msg.text()) == msg
    assert json.loads(msg.text())["manifestUri"] == manifest_uri  # camelCase on the wire


@pytest.mark.parametrize("char", ["x", '"', "\u00e9", "\U0001f600"])
def test_a_long_result_drops_figures_in_order_and_always_fits(char: str) -> None:
    m = model()
    manifest_uri = storage.join(prefix_of(m), "manifest.json")
    order = TerminationMessage.DROP_ORDER
    for length in range(0, 6000, 97):
        gate = GateVerdict(passed=False, max_metric_drop=0.02, reason=char * length)
        msg = TerminationMessage.from_result(compression_result(m, gate=gate), manifest_uri)
        assert len(msg.text().encode()) <= TERMINATION_MESSAGE_LIMIT
        dropped = [f for f in order if getattr(msg, f) is None]
        assert dropped == list(order[: len(dropped)]), dropped  # always the defined order
        # Identity, verdict and manifest location are never dropped.
        parsed = TerminationMessage.parse(msg.text())
        assert (parsed.name, parsed.namespace, parsed.spec_hash) == (
            "digits-cnn",
            "vision",
            m.spec.spec_hash(),
        )
        assert parsed.manifest_uri == manifest_uri and parsed.gate.passed is False
        if len(dropped) < len(order):
            assert parsed.gate.reason == gate.reason  # the reason is cut only as a last resort


def test_a_message_whose_identity_cannot_fit_is_refused_not_cut() -> None:
    m = model()
    result = compression_result(m, name="n" * 5000)
    with pytest.raises(ValueError, match="even without its figures"):
        TerminationMessage.from_result(result, "s3://models/edge/manifest.json")


# ------------------------------------------------- what the operator believes


def test_a_short_message_is_completed_from_a_verified_manifest() -> None:
    m = model()
    manifest_uri = storage.join(prefix_of(m), "manifest.json")
    full = compression_result(m)
    short = TerminationMessage.from_result(full, manifest_uri).model_copy(
        update={f: None for f in TerminationMessage.DROP_ORDER}
    )
    merged = results.merge_manifest(short, full.model_dump_json(by_alias=True), job_of(m), m)
    assert merged.complete and merged.artifact == full.artifact
    assert results.results_status(merged).latency.speedup == 2.0


@pytest.mark.parametrize(
    "over",
    [
        {"name": "someone-else"},
        {"namespace": "other-team"},
        {"spec_hash": "ffffffffffffffff"},
        {"artifact": figures("s3://models/edge/vision/digits-cnn/other/model.onnx")},
        {"artifact": figures("s3://elsewhere/vision/digits-cnn/x/model.onnx")},
        {"gate": GateVerdict(passed=False, max_metric_drop=0.02, reason="rejected")},
        {"gate": GateVerdict(passed=True, max_metric_drop=0.5, reason="looser")},
    ],
)
def test_a_manifest_is_held_to_the_messages_checks(over: dict) -> None:
    m = model()
    manifest_uri = storage.join(prefix_of(m), "manifest.json")
    short = TerminationMessage.from_result(compression_result(m), manifest_uri).model_copy(
        update={"artifact": None, "evaluation": None}
    )
    manifest = compression_result(m, **over).model_dump_json(by_alias=True)
    with pytest.raises(results.UntrustedResult, match=r"manifest\.json"):
        results.merge_manifest(short, manifest, job_of(m), m)


def test_a_manifest_that_is_not_a_result_is_refused() -> None:
    m = model()
    short = TerminationMessage.parse(
        json.dumps(
            {
                "name": "digits-cnn",
                "specHash": m.spec.spec_hash(),
                "gate": {"passed": True, "maxMetricDrop": 0.02, "reason": "ok"},
            }
        )
    )
    for raw in (b"{}", b"not json", b'{"name": "digits-cnn"}'):
        with pytest.raises(results.UntrustedResult, match="not a compression result"):
            results.merge_manifest(short, raw, job_of(m), m)


@pytest.mark.slow
def test_what_the_compressor_writes_the_operator_trusts(digits, tmp_path: Path) -> None:
    """The real CLI writes the message and manifest; the operator's checks accept both."""
    m = model(output=str(tmp_path / "out"))
    doc = m.wire()
    doc["spec"].update(
        source={"uri": str(digits.model_path)},
        evaluation={"dataset": str(digits.val), "maxMetricDrop": 0.02, "latencyRuns": 5},
    )
    doc["metadata"] = {"name": "digits-cnn", "namespace": "vision"}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    proc = cli_process.compress(spec, env={"EDGESLIM_TERMINATION_LOG": str(term)})
    assert proc.returncode == 0, proc.stderr[-3000:]

    written = CompressedModel.model_validate({**doc, "metadata": {**doc["metadata"], "uid": UID}})
    msg = results.parse_message(term.read_text())
    assert msg.complete and len(term.read_bytes()) <= TERMINATION_MESSAGE_LIMIT
    results.verify(msg, job_of(written), written)
    manifest = storage.read_bytes(msg.manifest_uri, what="manifest")
    merged = results.merge_manifest(msg, manifest, job_of(written), written)
    assert merged.artifact == msg.artifact and merged.gate.passed
