"""fetch -> load -> [simplify|prune|distill|quantize]* -> evaluate -> gate -> export -> push.

The one entry point both the CLI and the in-cluster compressor Job call.
Every dataset is fetched and checked against the model before the first step
runs, so a bad spec fails in seconds, not after an hour of distillation, and
nothing is written to the output until the result is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeslim import __version__, storage
from edgeslim.api.result import (
    CompressionResult,
    EvaluationFigures,
    GateVerdict,
    StepRecord,
)
from edgeslim.api.spec import CompressedModel, Evaluation
from edgeslim.compressor import datasets, evaluate, graph, model_io, steps
from edgeslim.compressor.datasets import Dataset
from edgeslim.errors import BadInput

MODEL_FILE = "model.onnx"
# A rejected artifact is kept for inspection under a name no deployer looks for.
REJECTED_MODEL_FILE = "model.rejected.onnx"
MANIFEST_FILE = "manifest.json"
TERMINATION_MESSAGE_LIMIT = 4096


@dataclass
class Outcome:
    result: CompressionResult
    model_uri: str
    manifest_uri: str


class Workspace:
    """Fetches each URI once (with its sha256 check) into a scratch folder, and
    reads each dataset once however many steps (and the pre-flight) bind it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, Path] = {}
        self.arrays: dict[str, dict[str, np.ndarray]] = {}

    def fetch(self, uri: str, sha256: str | None, what: str) -> Path:
        if uri not in self.files:
            dest = self.root / f"fetch-{len(self.files)}"
            dest.mkdir(parents=True, exist_ok=True)
            self.files[uri] = storage.fetch(uri, dest, sha256=sha256, what=what)
        return self.files[uri]

    def dataset(self, uri: str, sha256: str | None, model: onnx.ModelProto) -> Dataset:
        if uri not in self.arrays:
            self.arrays[uri] = datasets.read(self.fetch(uri, sha256, "dataset"), uri)
        return datasets.bind(self.arrays[uri], model, uri)

    def model(
        self, uri: str, sha256: str | None, example_from: str | None = None
    ) -> onnx.ModelProto:
        path = self.fetch(uri, sha256, "model")
        example = model_io.read_npz_example(self.files[example_from]) if example_from else None
        return model_io.load_model(path, uri, example)


def _datasets_in(obj: CompressedModel) -> list[tuple[str, str | None, str]]:
    """(uri, sha256, field) of every dataset the spec names, evaluation first."""
    ev = obj.spec.evaluation
    found = [(ev.dataset, ev.dataset_sha256, "evaluation.dataset")]
    for i, step in enumerate(obj.spec.pipeline):
        cfg = step.config
        if step.type == "distill":
            found.append((cfg.dataset, cfg.dataset_sha256, f"pipeline[{i}].distill.dataset"))
        if step.type == "quantize" and cfg.calibration_dataset:
            found.append(
                (cfg.calibration_dataset, None, f"pipeline[{i}].quantize.calibrationDataset")
            )
    return found


def compress(
    obj: CompressedModel,
    *,
    output: str | None,
    workdir: Path,
    progress: steps.Progress | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    reuse: bool = True,
) -> Outcome:
    """Run the spec's pipeline and write its result under <output>/<name>/<spec-hash>/.

    With `reuse`, a complete result already stored for this spec hash is
    returned as it is: a retried Job or a rerun never recomputes it, and an
    artifact that pods may be serving is never replaced by different bytes.
    """
    spec = obj.spec
    progress = progress or steps.NullProgress()
    output_uri = output or (spec.output.uri if spec.output else None)
    if not output_uri:
        raise BadInput("output: no output location; set spec.output.uri or pass --output")
    spec_hash = spec.spec_hash()
    prefix = storage.join(output_uri, obj.metadata.name, spec_hash)
    ws = Workspace(workdir)
    if reuse and (done := _stored_result(prefix, ws, log)) is not None:
        return done

    log(f"fetching {spec.source.uri}")
    source_path = ws.fetch(spec.source.uri, spec.source.sha256, "source model")
    ev_path = ws.fetch(
        spec.evaluation.dataset, spec.evaluation.dataset_sha256, "evaluation dataset"
    )
    source = model_io.load_model(
        source_path, f"source model {spec.source.uri}", model_io.read_npz_example(ev_path)
    )
    graph.constants_to_initializers(source)
    # Pre-flight: every dataset must fit the model before any step spends time.
    for uri, sha, field in _datasets_in(obj):
        try:
            ws.dataset(uri, sha, source)
        except BadInput as exc:
            raise BadInput(f"{field}: {exc}") from exc
    eval_data = ws.dataset(spec.evaluation.dataset, None, source).head(spec.evaluation.samples)

    ctx = steps.StepContext(
        source=source,
        workdir=workdir,
        load_dataset=ws.dataset,
        load_model=lambda uri, sha: ws.model(uri, sha, spec.evaluation.dataset),
        evaluation_dataset=spec.evaluation.dataset,
        train_datasets=[s.config.dataset for s in spec.pipeline if s.type == "distill"],
        progress=progress,
    )
    source_bytes = source_path.read_bytes()
    # Sizes and sha of the file as given; parameters of the loaded graph (for a
    # TorchScript source, the ONNX it was converted to).
    source_fig = graph.figures(source_bytes, source, uri=spec.source.uri)
    model, current = source, graph.figures(source.SerializeToString(), source)
    records: list[StepRecord] = []
    for i, entry in enumerate(spec.pipeline):
        log(f"step {i + 1}/{len(spec.pipeline)}: {entry.type}")
        started = time.perf_counter()
        try:
            out = steps.build(entry).run(model, ctx)
        except BadInput as exc:
            raise BadInput(f"pipeline[{i}].{entry.type}: {exc}") from exc
        data = out.model.SerializeToString()
        after = graph.figures(data, out.model)
        records.append(
            StepRecord(
                type=entry.type,
                config=entry.config.wire(),
                before=current,
                after=after,
                seconds=round(time.perf_counter() - started, 3),
                changed=after.sha256 != current.sha256,
                grew=after.size_bytes > current.size_bytes,
                notes=out.notes,
            )
        )
        model, current = out.model, after

    log("evaluating")
    result_bytes = model.SerializeToString()
    ev_fig, lat_fig, mem_fig = _measure(
        spec.evaluation, source, model, eval_data, workdir, progress
    )
    passed = ev_fig.drop <= spec.evaluation.max_metric_drop
    gate = GateVerdict(
        passed=passed,
        max_metric_drop=spec.evaluation.max_metric_drop,
        reason=_gate_reason(ev_fig, spec.evaluation.max_metric_drop, passed),
    )
    model_uri = storage.join(prefix, MODEL_FILE if passed else REJECTED_MODEL_FILE)
    manifest_uri = storage.join(prefix, MANIFEST_FILE)
    artifact = graph.figures(result_bytes, model, uri=model_uri)
    result = CompressionResult(
        name=obj.metadata.name,
        spec_hash=spec_hash,
        source=source_fig,
        artifact=artifact,
        steps=records,
        evaluation=ev_fig,
        latency=lat_fig,
        memory=mem_fig,
        compression_ratio=round(source_fig.size_bytes / artifact.size_bytes, 4),
        download_ratio=round(source_fig.gzip_size_bytes / artifact.gzip_size_bytes, 4),
        gate=gate,
        versions=_versions(),
    )
    log(f"writing {prefix}")
    # The model goes first and the manifest last: a manifest's presence means a complete result.
    storage.put_bytes(result_bytes, model_uri)
    storage.put_bytes(
        json.dumps(result.wire(), indent=2).encode(), manifest_uri, "application/json"
    )
    return Outcome(result=result, model_uri=model_uri, manifest_uri=manifest_uri)


def _stored_result(prefix: str, ws: Workspace, log: Callable[[str], None]) -> Outcome | None:
    """The result already written under `prefix`, if it is complete and intact."""
    manifest_uri = storage.join(prefix, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        return None
    try:
        result = CompressionResult.model_validate_json(
            storage.read_bytes(manifest_uri, what="stored manifest")
        )
        ws.fetch(result.artifact.uri, result.artifact.sha256, "stored artifact")
    except (BadInput, ValueError) as exc:
        # Unreadable or mismatched: compute it again (and overwrite it) rather than trust it.
        log(f"ignoring the stored result under {prefix}: {exc}")
        return None
    log(f"reusing the stored result for spec hash {result.spec_hash} ({manifest_uri})")
    return Outcome(result=result, model_uri=result.artifact.uri, manifest_uri=manifest_uri)


def _measure(
    cfg: Evaluation,
    source: onnx.ModelProto,
    result: onnx.ModelProto,
    data: Dataset,
    workdir: Path,
    progress: steps.Progress,
):
    src_sess, out_sess = evaluate.session(source), evaluate.session(result)
    src_out = evaluate.run_batched(src_sess, data, progress=progress, label="evaluate source")
    out_out = evaluate.run_batched(out_sess, data, progress=progress, label="evaluate compressed")
    ev_fig = evaluate.evaluation_figures(cfg, data, src_out, out_out)
    with progress.task("latency", total=2) as bar:
        src_lat = evaluate.latency(src_sess, data, cfg.latency_runs)
        bar.advance()
        out_lat = evaluate.latency(out_sess, data, cfg.latency_runs)
        bar.advance()
    paths = workdir / "source.onnx", workdir / "compressed.onnx"
    onnx.save(source, paths[0])
    onnx.save(result, paths[1])
    mem = evaluate.memory_figures(paths[0], paths[1], data, workdir)
    return ev_fig, evaluate.latency_figures(src_lat, out_lat), mem


def _gate_reason(ev: EvaluationFigures, limit: float, passed: bool) -> str:
    change = f"{ev.metric} {ev.baseline:.4f} -> {ev.compressed:.4f} (drop {ev.drop:+.4f})"
    if passed:
        return f"{change} is within maxMetricDrop {limit:g}"
    return f"{change} exceeds maxMetricDrop {limit:g}: rejected, not deployable"


def _versions() -> dict[str, str]:
    import numpy
    import onnxruntime
    import onnxslim
    import torch

    return {
        "edgeslim": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxslim": onnxslim.__version__,
        "numpy": numpy.__version__,
    }


def write_termination_message(outcome: Outcome) -> Path | None:
    """The compact result for the operator, through the pod's termination-message file."""
    path = os.environ.get("EDGESLIM_TERMINATION_LOG")
    if not path:
        default = Path("/dev/termination-log")
        if not default.exists():
            return None
        path = str(default)
    summary = {**outcome.result.summary(), "manifestUri": outcome.manifest_uri}
    data = json.dumps(summary, separators=(",", ":"))
    if len(data) > TERMINATION_MESSAGE_LIMIT:
        data = json.dumps({k: summary[k] for k in ("name", "specHash", "gate", "manifestUri")})
    Path(path).write_text(data)
    return Path(path)
