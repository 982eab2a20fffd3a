"""spec.optimize end to end: the search over recipes, its manifest, its budget, a kill.

Real models built here: the digits CNN (conftest) and a small BERT from a
`transformers` config, trained on a toy task, with outlier channels like those
of real transformers: its naive static int8 misses the gate, and the search
must find a mixed-precision recipe that keeps the sensitive nodes in float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from pydantic import ValidationError

from edgeslim import storage
from edgeslim.api.result import CandidateFigures, CompressionResult, pareto_front
from edgeslim.api.spec import (
    Evaluation,
    Objective,
    PipelineStep,
    QuantizeConfig,
)
from edgeslim.api.termination import TerminationMessage
from edgeslim.cli import EXIT_OK, EXIT_REJECTED, main
from edgeslim.compressor import datasets, evaluate
from edgeslim.compressor.optimize import Search, search_all, student_formats
from edgeslim.compressor.optimize_candidates import CandidateContext, Recipe, evaluate_candidate
from edgeslim.compressor.pipeline import reuse_mismatch
from edgeslim.compressor.quantize import Quantize
from edgeslim.compressor.steps import StepContext
from edgeslim.operator.results import results_status
from tests.archs import digits_build
from tests.results import expected_prefix

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 16


@dataclass(frozen=True)
class ToyBert:
    model: Path
    val: Path


def _toy_task(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Is the first half of the sequence's token sum bigger than the second's?"""
    ids = rng.integers(4, VOCAB, (n, SEQ))
    return ids, (ids[:, : SEQ // 2].sum(1) > ids[:, SEQ // 2 :].sum(1)).astype(np.int64)


@pytest.fixture(scope="module")
def toy_bert(tmp_path_factory: pytest.TempPathFactory) -> ToyBert:
    """A 2-layer BERT (hidden 64) trained for a few steps, with two outlier channels
    per attention layer: query channels scaled up, the matching key channels down by
    the same factor. The float model computes exactly the same scores; per-tensor
    int8 of those activations loses the other channels' resolution."""
    out = tmp_path_factory.mktemp("toy-bert")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    config._attn_implementation = "eager"
    module = transformers.BertForSequenceClassification(config)
    ids, labels = _toy_task(2048, rng)
    optimiser = torch.optim.Adam(module.parameters(), 2e-3)
    module.train()
    for _ in range(120):
        batch = rng.integers(0, len(ids), 64)
        loss = module(
            input_ids=torch.from_numpy(ids[batch]), labels=torch.from_numpy(labels[batch])
        ).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    module.eval()
    with torch.no_grad():
        for layer in module.bert.encoder.layer:
            attention = layer.attention.self
            for channel, factor in ((3, 150.0), (40, 100.0)):
                attention.query.weight[channel] *= factor
                attention.query.bias[channel] *= factor
                attention.key.weight[channel] /= factor
                attention.key.bias[channel] /= factor
    val_ids, val_labels = _toy_task(512, np.random.default_rng(1))
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.from_numpy(val_ids[:2]),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}},
    )
    (out / "bert.onnx").write_bytes(buf.getvalue())
    np.savez(out / "val.npz", input_ids=val_ids, y=val_labels)
    return ToyBert(out / "bert.onnx", out / "val.npz")


def spec(
    name: str, model: Path, val: Path, out: Path, evaluation: dict, **optimize: object
) -> dict:
    return {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": str(model)},
            "evaluation": {"dataset": str(val), "latencyRuns": 10, **evaluation},
            "optimize": optimize,
            "output": {"uri": str(out)},
        },
    }


def bert_spec(bert: ToyBert, out: Path, **optimize: object) -> dict:
    evaluation = {"metric": "cosine", "maxMetricDrop": 0.005}
    return spec("toy-bert", bert.model, bert.val, out, evaluation, **optimize)


def digits_spec(digits, out: Path, **optimize: object) -> dict:
    evaluation = {"metric": "accuracy", "maxMetricDrop": 0.01}
    return spec("digits-cnn", digits.model_path, digits.val, out, evaluation, **optimize)


def compress(doc: dict, tmp_path: Path) -> int:
    """The CLI in-process, from an empty working directory that must stay empty
    (onnxruntime's shape inference once left temp files in the caller's folder)."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    with contextlib.chdir(cwd):
        code = main(["compress", str(path), "--quiet"])
    assert not list(cwd.iterdir()), "edgeslim compress wrote into its working directory"
    return code


def folder(doc: dict, out: Path) -> Path:
    return Path(expected_prefix(doc, str(out)))


def manifest(doc: dict, out: Path) -> CompressionResult:
    return CompressionResult.model_validate_json((folder(doc, out) / "manifest.json").read_text())


def accuracy_of(model_path: Path, val: Path) -> float:
    model = onnx.load(str(model_path))
    data = datasets.bind(datasets.read(val, str(val)), model, str(val))
    out = evaluate.run_batched(evaluate.session(model), data)
    return float((out.argmax(1) == data.labels).mean())


def test_digits_search_passes_and_writes_table_and_pareto(digits, tmp_path: Path) -> None:
    """Through the real CLI: exit 0, the candidates table, the pictures beside the manifest."""
    out = tmp_path / "out"
    doc = digits_spec(digits, out, maxCandidates=4)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "compress", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert "Candidates (4 tried, objective download" in done.stdout
    assert "static int8 per-channel minmax" in done.stdout
    result = manifest(doc, out)
    # A Conv model gets no weight-only (MatMul) formats.
    assert [c.name for c in result.candidates] == [
        "static int8 per-channel minmax",
        "dynamic int8",
        "static int8 per-channel percentile",
        "static int8 per-tensor minmax",
    ]
    assert len(result.candidates) == 4 and result.search.complete
    chosen = result.candidates[result.chosen]
    assert chosen.passed and result.gate.passed
    assert result.download_ratio >= 3.5, result.download_ratio
    # The chosen candidate is the smallest passing download, and what was written.
    passing = [c for c in result.candidates if c.passed]
    assert chosen.gzip_size_bytes == min(c.gzip_size_bytes for c in passing)
    written = folder(doc, out)
    assert result.artifact.sha256 == storage.sha256_file(written / "model.onnx")
    assert accuracy_of(written / "model.onnx", digits.val) >= result.evaluation.baseline - 0.01
    # Its recipe is a pipeline a spec could pin.
    assert [PipelineStep.model_validate(s).type for s in chosen.recipe] == ["quantize"]
    assert (written / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (written / "pareto.svg").read_bytes()[:500]
    assert f"pareto plot {written / 'pareto.png'}" in done.stdout


def test_transformer_search_keeps_sensitive_nodes_in_float(toy_bert, tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = bert_spec(toy_bert, out)
    assert compress(doc, tmp_path) == EXIT_OK
    result = manifest(doc, out)
    by_name = {c.name: c for c in result.candidates}
    # MatMul-heavy: weight-only candidates (onnxruntime's MatMulNBits) are measured too.
    int4 = by_name["weight-only int4"]
    assert int4.drop is not None and int4.size_bytes < by_name["weight-only int8"].size_bytes
    naive = by_name["static int8 per-channel minmax"]
    assert not naive.passed and naive.drop > 2 * 0.005, naive
    mixed = [c for c in result.candidates if c.float_nodes and c.passed]
    assert mixed, [(c.name, c.drop) for c in result.candidates]
    best_mixed = min(mixed, key=lambda c: len(c.float_nodes))
    # Fewer nodes float than all the quantizable ones, and the outlier path among them.
    assert len(best_mixed.float_nodes) < 40
    assert any("attention/self/query" in n for n in best_mixed.float_nodes)
    assert any("attention/self/key" in n for n in best_mixed.float_nodes)
    recipe = best_mixed.recipe[0]["quantize"]
    assert recipe["mode"] == "static" and recipe["excludeNodes"] == best_mixed.float_nodes
    # The sensitivity analysis names the nodes, the query projections ranked first.
    ranked = result.search.sensitivity
    assert ranked and ranked[0].recovery >= ranked[-1].recovery
    assert "attention/self/query" in ranked[0].node, ranked[:3]
    # The chosen one passes, and is the smallest download among those that do.
    chosen = result.candidates[result.chosen]
    assert chosen.passed and result.gate.passed
    assert chosen.gzip_size_bytes == min(c.gzip_size_bytes for c in result.candidates if c.passed)
    assert result.search.sensitive_nodes == chosen.float_nodes
    # status.results' figures travel in the termination message.
    message = TerminationMessage.from_result(result, "manifest.json")
    assert message.candidates_tried == len(result.candidates)
    assert message.pareto and len(message.pareto) <= 5
    assert message.complete
    status = results_status(TerminationMessage.parse(message.text()))
    assert status.candidates_tried == len(result.candidates)
    assert [p.index for p in status.pareto] == [p.index for p in pareto_front(result.candidates)]


def _opset12_constant_weights(digits, path: Path) -> Path:
    """The trained digits CNN as an older exporter writes it: opset 12, weights in
    Constant nodes (per-channel QDQ needs opset 13; the search must cope)."""
    digits_build().reexport(digits.model_path, path, 12, constant_weights=True)
    return path


def test_an_opset_12_model_with_constant_weights_is_searched(digits, tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = _opset12_constant_weights(digits, tmp_path / "cnn-opset12.onnx")
    evaluation = {"metric": "accuracy", "maxMetricDrop": 0.01}
    doc = spec("old-exporter", model, digits.val, out, evaluation, maxCandidates=4)
    assert compress(doc, tmp_path) == EXIT_OK
    result = manifest(doc, out)
    assert all(c.drop is not None for c in result.candidates), result.candidates
    assert result.gate.passed and result.download_ratio >= 3.5
    # Static per-channel int8, which crashed on such files before, is built and passes.
    first = result.candidates[0]
    assert first.name == "static int8 per-channel minmax" and first.passed, first


def test_budget_is_respected_and_nothing_passing_is_rejected(toy_bert, tmp_path: Path) -> None:
    """maxCandidates 3 and a gate nothing meets: exit 3, the closest kept as rejected."""
    out = tmp_path / "out"
    doc = bert_spec(toy_bert, out, maxCandidates=3)
    doc["spec"]["evaluation"]["maxMetricDrop"] = 0.0
    assert compress(doc, tmp_path) == EXIT_REJECTED
    result = manifest(doc, out)
    assert len(result.candidates) == 3
    assert result.search.stopped_by == "maxCandidates" and result.search.complete
    assert not any(c.passed for c in result.candidates)
    closest = min(result.candidates, key=lambda c: c.drop)
    assert result.chosen == closest.index and not result.gate.passed
    names = sorted(p.name for p in folder(doc, out).iterdir())
    assert names == ["manifest.json", "model.rejected.onnx", "pareto.png", "pareto.svg"]


def test_best_so_far_survives_a_kill(digits, tmp_path: Path) -> None:
    """The CLI killed mid-search leaves the best passing candidate usable, and marked as
    an unfinished search, so a rerun searches again instead of reusing it."""
    out = tmp_path / "out"
    # trainDataset makes the search long (prune + distill candidates follow the formats).
    doc = digits_spec(digits, out, trainDataset=str(digits.train))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    written = folder(doc, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "compress", str(path), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not (written / "manifest.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no best-so-far manifest written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    result = manifest(doc, out)
    assert result.gate.passed and not result.search.complete
    assert result.candidates[result.chosen].passed
    model = written / "model.onnx"
    assert storage.sha256_file(model) == result.artifact.sha256
    assert accuracy_of(model, digits.val) >= result.evaluation.baseline - 0.01
    inputs = result.inputs
    prefix = str(written)
    why = reuse_mismatch(result, "digits-cnn", "default", result.spec_hash, prefix, inputs)
    assert why is not None and "stopped before it finished" in why


def _candidate_context(digits, workdir: Path, objective: Objective) -> CandidateContext:
    """What the search measures candidates against, built by hand for the digits model."""
    source = digits.model()
    arrays = datasets.read(digits.val, str(digits.val))
    data = datasets.bind(arrays, source, "val")
    step_ctx = StepContext(
        source=source,
        workdir=workdir,
        load_dataset=lambda uri, sha, model: datasets.bind(arrays, model, uri),
        load_model=lambda uri, sha: source,
        evaluation_dataset=str(digits.val),
        calibration_cache=workdir / "calibration",
    )
    evaluation = Evaluation(dataset=str(digits.val), metric="accuracy", maxMetricDrop=0.01)
    return CandidateContext(
        source=source,
        step_ctx=step_ctx,
        evaluation=evaluation,
        max_metric_drop=0.01,
        objective=objective,
        data=data,
        source_out=evaluate.run_batched(evaluate.session(source), data),
        # A source that answers instantly: every candidate is slower than it.
        source_latency=evaluate.Latency(p50_ms=1e-9, p95_ms=1e-9),
        latency_runs=5,
    )


def test_latency_objective_drops_candidates_slower_than_the_source(digits, tmp_path: Path) -> None:
    recipe = Recipe(name="dynamic", steps=[{"quantize": {"mode": "dynamic"}}])
    for objective, passed in ((Objective.latency, False), (Objective.download, True)):
        ctx = _candidate_context(digits, tmp_path, objective)
        result = evaluate_candidate(recipe, ctx, index=7)
        f = result.figures
        assert (f.index, f.passed, f.drop is not None) == (7, passed, True)
        assert ("slower than the source" in f.reason) is not passed
        assert result.model is not None and [r.type for r in result.records] == ["quantize"]


def test_max_seconds_is_read_against_the_search_clock(digits, tmp_path: Path) -> None:
    """The budget is checked before every candidate: with a clock that moves 40 s per
    reading, a 100 s budget lets the candidates started at 0, 40 and 80 s run."""
    ticks = iter(range(0, 10_000, 40))
    bests: list[int] = []
    search = Search(
        ctx=_candidate_context(digits, tmp_path, Objective.download),
        max_candidates=32,
        deadline=100.0,
        on_best=lambda s: bests.append(s.best.figures.index),
        log=lambda line: None,
        clock=lambda: float(next(ticks)),
    )
    search_all(search, None, None)
    assert search.stopped_by == "maxSeconds"
    assert [r.figures.index for r in search.results] == [0, 1, 2]
    assert search.best is not None and bests and bests[-1] == search.best.figures.index


def test_a_recipe_that_cannot_be_built_is_a_failed_candidate(digits, tmp_path: Path) -> None:
    ctx = _candidate_context(digits, tmp_path, Objective.download)
    recipe = Recipe(name="bad", steps=[{"quantize": {"mode": "static", "excludeNodes": ["x"]}}])
    result = evaluate_candidate(recipe, ctx, index=2)
    assert result.model is None and not result.passed and result.figures.drop is None
    assert result.figures.reason.startswith("failed: BadInput: quantize.excludeNodes: no node")


def test_a_cached_calibration_gives_the_same_model(digits, tmp_path: Path) -> None:
    ctx = _candidate_context(digits, tmp_path, Objective.download)
    step = Quantize(QuantizeConfig(mode="static", calibrationSamples=64))
    cached = [step.run(ctx.source, ctx.step_ctx).model.SerializeToString() for _ in range(2)]
    assert len(list((tmp_path / "calibration").iterdir())) == 1  # written once, then read
    plain = dataclasses.replace(ctx.step_ctx, calibration_cache=None)
    assert cached[0] == cached[1] == step.run(ctx.source, plain).model.SerializeToString()


def test_weight_only_settings_belong_to_weight_only() -> None:
    assert QuantizeConfig(mode="weightOnly", bits=8, blockSize=64).bits == 8
    for bad in ({"mode": "static", "bits": 4}, {"mode": "weightOnly", "blockSize": 48}):
        with pytest.raises(ValidationError):
            QuantizeConfig.model_validate(bad)


def test_pareto_front_keeps_the_undominated_smallest_first() -> None:
    def c(i: int, size: int, drop: float | None) -> CandidateFigures:
        return CandidateFigures(
            index=i, name=f"c{i}", recipe=[], gzip_size_bytes=size, drop=drop, passed=True
        )

    front = pareto_front([c(0, 100, 0.02), c(1, 200, 0.01), c(2, 300, 0.015), c(3, 50, None)])
    assert [p.index for p in front] == [0, 1]
    many = [c(i, 100 + i, 0.1 - i / 100) for i in range(8)]
    assert [p.index for p in pareto_front(many)] == [0, 1, 2, 3, 4]


def test_pruned_students_are_quantized_with_the_whole_passing_formats() -> None:
    """A MatMul-heavy model's best format is two steps (simplify + dynamic int8): a
    pruned student gets both, not only the quantize step; a pruned candidate is no
    format, and at most two formats are tried, best first."""

    def c(name: str, *recipe: dict) -> CandidateFigures:
        return CandidateFigures(index=0, name=name, recipe=list(recipe), passed=True)

    simplify, dynamic = {"simplify": {}}, {"quantize": {"mode": "dynamic", "perChannel": False}}
    passing = [
        c("prune 50% + distill", {"prune": {"sparsity": 0.5}}, {"distill": {"dataset": "d"}}),
        c("simplify + dynamic int8 per-tensor", simplify, dynamic),
        c("dynamic int8", {"quantize": {"mode": "dynamic"}}),
        c("fp16", {"quantize": {"mode": "fp16"}}),
    ]
    formats = student_formats(passing)
    assert [name for name, _ in formats] == ["simplify + dynamic int8 per-tensor", "dynamic int8"]
    steps_ = formats[0][1]
    assert [s.type for s in steps_] == ["simplify", "quantize"]
    assert steps_[1].quantize.mode == "dynamic" and steps_[1].quantize.per_channel is False


@pytest.mark.slow
def test_digits_with_a_train_set_prunes_distills_and_quantizes(digits, tmp_path: Path) -> None:
    """Iterative pruning: the second cut starts from the first passing student (cut,
    distill, cut more), and a passing student is quantized."""
    out = tmp_path / "out"
    # The six formats, the first cut and its quantization, the second cut and its.
    doc = digits_spec(digits, out, trainDataset=str(digits.train), maxCandidates=10)
    assert compress(doc, tmp_path) == EXIT_OK
    result = manifest(doc, out)
    chosen = result.candidates[result.chosen]
    types = [PipelineStep.model_validate(s).type for s in chosen.recipe]
    cuts = len(types) // 2
    assert cuts >= 1 and types == ["prune", "distill"] * cuts + ["quantize"], chosen.name
    assert result.download_ratio >= 8, result.download_ratio
    assert result.evaluation.drop <= 0.01
    assert [s.type for s in result.steps] == types
    probes = [c for c in result.candidates if c.name.endswith("+ distill")]
    assert [p.name for p in probes] == ["prune 50% + distill", "prune 50% > 50% + distill"]
    assert probes[0].passed and probes[1].recipe[:2] == probes[0].recipe
    quantized = [c for c in result.candidates if c.name.startswith("prune 50% + distill + ")]
    assert quantized and quantized[0].recipe[:2] == probes[0].recipe
    assert json.loads((folder(doc, out) / "manifest.json").read_text())["chosen"] == chosen.index


@pytest.mark.slow
def test_max_seconds_ends_the_search_with_the_best_so_far(digits, tmp_path: Path) -> None:
    """A search far longer than its budget (pruning with distillation) stops at it,
    between candidates, with a passing result written as complete."""
    out = tmp_path / "out"
    # The whole search takes over twice the budget (each pruning probe distills).
    doc = digits_spec(digits, out, trainDataset=str(digits.train), maxSeconds=1)
    assert compress(doc, tmp_path) == EXIT_OK
    result = manifest(doc, out)
    assert result.search.stopped_by == "maxSeconds" and result.search.complete
    assert result.gate.passed and result.candidates[result.chosen].passed
    # Every candidate but the last started before the budget ran out.
    started = sum(c.seconds for c in result.candidates[:-1])
    assert started < 1 + 1, [(c.name, c.seconds) for c in result.candidates]
