"""Prove a compressed model is still good: metric, latency, memory, against its source.

Both models run in onnxruntime on the same evaluation data. Latency is batch 1
on one intra-op thread after warm-up, which is what a small edge CPU sees and
keeps numbers stable on a shared machine. Peak memory is measured in a fresh
process per model, since a process's high-water mark never goes back down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeslim.api.result import EvaluationFigures, LatencyFigures, MemoryFigures
from edgeslim.api.spec import Evaluation, Metric
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.steps import NullProgress, Progress
from edgeslim.errors import BadInput

WARMUP_RUNS = 10


def runtime_errors() -> tuple[type[BaseException], ...]:
    """What onnxruntime raises when it refuses a model (Fail, InvalidGraph, NotImplemented, ...).

    Its pybind classes derive from Exception, not RuntimeError, so they are
    collected from the module rather than listed (the set grows between releases).
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception)]
    return (*found, RuntimeError)


def session(model: onnx.ModelProto | bytes | Path, threads: int = 1, *, where: str | None = None):
    """An onnxruntime session on one CPU thread (or `threads`).

    `where` marks a model someone handed us (the source, a teacher): then
    onnxruntime refusing it is BadInput naming it rather than our crash.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Fatal only: failures reach the caller as exceptions (one line); its own copy on
    # stderr would break the CLI's one-line errors.
    opts.log_severity_level = 4
    try:
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            opts,
            providers=["CPUExecutionProvider"],
        )
    except (*runtime_errors(), ValueError) as exc:
        if where is None:
            raise
        raise BadInput(f"{where}: onnxruntime cannot load the model: {_first_line(exc)}") from exc


def run(sess, feed: dict[str, np.ndarray], where: str | None = None) -> list:
    """`sess.run` on `feed`; with `where` (a model someone handed us), onnxruntime
    failing on it (a Conv with group 0, a Reshape to an impossible shape) is BadInput."""
    try:
        return sess.run(None, feed)
    except runtime_errors() as exc:
        if where is None:
            raise
        raise BadInput(f"{where}: onnxruntime cannot run the model: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _batch_size(sess, wanted: int) -> int:
    first = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    return first if isinstance(first, int) and first > 0 else wanted


class _WrongRows(Exception):
    """A batch's first output does not hold one row per sample (a batch hard-coded to 1)."""


def run_batched(
    sess,
    data: Dataset,
    batch_size: int = 256,
    progress: Progress | None = None,
    label: str = "evaluate",
    where: str | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:
    """The first output of `sess` over the whole dataset, concatenated.

    A model that works one sample at a time but fails on a larger batch, or
    answers it with other than one row per sample (a Reshape to [1, -1], a
    graph written for batch 1 behind a dynamic input), is run one sample at a
    time from there on, and `notes` gets a line saying so. What fails one
    sample at a time is raised; `where` names a user-supplied model, and then
    it is BadInput naming that model and onnxruntime's message.
    """
    size = _batch_size(sess, batch_size)
    outputs = []
    n = len(data)
    start = 0
    with (progress or NullProgress()).task(label, total=n) as bar:
        while start < n:
            stop = min(start + size, n)
            try:
                out = np.asarray(sess.run(None, data.batch(start, stop))[0])
                if size > 1 and (out.ndim == 0 or len(out) != stop - start):
                    raise _WrongRows(
                        f"its first output has shape {list(out.shape)} for {stop - start} samples"
                    )
            except (*runtime_errors(), _WrongRows) as exc:
                if size == 1:
                    if where is None:
                        raise
                    raise BadInput(
                        f"{where}: onnxruntime cannot run the model: {_first_line(exc)}"
                    ) from exc
                if notes is not None:
                    why = _first_line(exc)
                    why = why if isinstance(exc, _WrongRows) else f"onnxruntime fails: {why}"
                    notes.append(
                        f"{label}: {where or 'the model'} ran one sample at a time "
                        f"(at batch {stop - start} {why})"
                    )
                size = 1
                continue
            outputs.append(out)
            bar.advance(stop - start)
            start = stop
    return np.concatenate(outputs).astype(np.float32)


def metric(
    kind: Metric, out: np.ndarray, reference: np.ndarray, labels: np.ndarray | None
) -> float:
    """The metric of `out`; `reference` is the source model's output on the same data."""
    flat, ref = out.reshape(len(out), -1), reference.reshape(len(reference), -1)
    if kind is Metric.accuracy:
        return float((flat.argmax(1) == labels).mean())
    if kind is Metric.top5:
        top = np.argsort(-flat, axis=1)[:, :5]
        return float((top == labels[:, None]).any(1).mean())
    if kind is Metric.agreement:
        return float((flat.argmax(1) == ref.argmax(1)).mean())
    if kind is Metric.cosine:
        # float64 and no absolute floor on the norms: cosine is scale-free, and an
        # untrained detector head's outputs (about 1e-14) made a fixed 1e-12 floor
        # score even the source against itself as 0.
        a, b = flat.astype(np.float64), ref.astype(np.float64)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        num = (a * b).sum(1)
        return float(np.mean(np.divide(num, den, out=np.ones_like(num), where=den > 0)))
    return float(np.mean((flat - ref) ** 2))


def evaluation_figures(
    cfg: Evaluation, data: Dataset, source_out: np.ndarray, compressed_out: np.ndarray
) -> EvaluationFigures:
    if cfg.metric.needs_labels and data.labels is None:
        raise BadInput(f"evaluation.metric {cfg.metric.value} needs labels y in {data.source}")
    labels = None if data.labels is None else data.labels.astype(np.int64).reshape(-1)
    baseline = metric(cfg.metric, source_out, source_out, labels)
    compressed = metric(cfg.metric, compressed_out, source_out, labels)
    drop = baseline - compressed if cfg.metric.higher_is_better else compressed - baseline
    return EvaluationFigures(
        metric=cfg.metric.value,
        samples=len(data),
        baseline=round(baseline, 6),
        compressed=round(compressed, 6),
        drop=round(drop, 6),
    )


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float


def latency(sess, data: Dataset, runs: int) -> Latency:
    """Batch-1 latency percentiles, cycling over the first samples."""
    samples = [data.batch(i, i + 1) for i in range(min(len(data), 32))]
    for i in range(WARMUP_RUNS):
        sess.run(None, samples[i % len(samples)])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, samples[i % len(samples)])
        times.append((time.perf_counter() - start) * 1000)
    return Latency(float(np.percentile(times, 50)), float(np.percentile(times, 95)))


def latency_figures(source: Latency, compressed: Latency) -> LatencyFigures:
    speedup = source.p50_ms / compressed.p50_ms if compressed.p50_ms > 0 else 0.0
    return LatencyFigures(
        source_p50_ms=round(source.p50_ms, 4),
        source_p95_ms=round(source.p95_ms, 4),
        compressed_p50_ms=round(compressed.p50_ms, 4),
        compressed_p95_ms=round(compressed.p95_ms, 4),
        speedup=round(speedup, 3),
        # 5% slack: timing noise on a busy machine should not cry wolf.
        slower=speedup < 0.95,
    )


def peak_rss_bytes(model_path: Path, sample_path: Path) -> int:
    """Peak resident memory of a fresh process that loads the model and runs one sample."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.compressor.memprobe", str(model_path), str(sample_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {model_path}: {proc.stderr.strip()[-500:]}")
    return int(json.loads(proc.stdout)["peakRssBytes"])


def memory_figures(
    source_path: Path, compressed_path: Path, data: Dataset, workdir: Path
) -> MemoryFigures:
    sample = workdir / "memprobe-sample.npz"
    np.savez(sample, **data.batch(0, 1))
    return MemoryFigures(
        source_peak_rss_bytes=peak_rss_bytes(source_path, sample),
        compressed_peak_rss_bytes=peak_rss_bytes(compressed_path, sample),
    )
