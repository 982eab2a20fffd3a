"""The interface every pipeline step implements, and the registry of steps.

A step reads an ONNX model and returns a new one plus notes on what it did;
the pipeline measures before/after around it. Heavy imports (torch,
onnxruntime.quantization) happen inside `run` so importing the registry is cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx

from edgeslim.api.result import ModelFigures, StepRecord
from edgeslim.api.spec import PipelineStep
from edgeslim.compressor.datasets import Dataset


class Ticker(Protocol):
    def advance(self, amount: float = 1) -> None: ...

    def note(self, text: str) -> None:
        """Replace the task's trailing status text (e.g. the current loss)."""


class Progress(Protocol):
    """Where long loops report progress: rich bars in the CLI, log lines in a Job."""

    def task(self, description: str, total: float | None) -> AbstractContextManager[Ticker]: ...


class _NullTicker:
    def advance(self, amount: float = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class NullProgress:
    def task(self, description: str, total: float | None) -> AbstractContextManager[Ticker]:
        from contextlib import nullcontext

        return nullcontext(_NullTicker())


@dataclass
class StepContext:
    """What a step may use besides the model it transforms."""

    source: onnx.ModelProto
    """The original model (distillation's teacher)."""
    workdir: Path
    load_dataset: Callable[[str, str | None, onnx.ModelProto], Dataset]
    """(uri, sha256, model) -> dataset bound to that model's inputs."""
    load_model: Callable[[str, str | None], onnx.ModelProto]
    """(uri, sha256) -> a checked ONNX model (e.g. a distillation student)."""
    evaluation_dataset: str
    train_datasets: list[str] = field(default_factory=list)
    """Datasets of distill steps in the pipeline, in order (default calibration data)."""
    progress: Progress = field(default_factory=NullProgress)
    calibration_cache: Path | None = None
    """Folder where static quantization keeps activation ranges per model and data, for
    callers that quantize one model many ways (the optimize search); None: no cache."""


@dataclass
class StepOutput:
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)


class Step(Protocol):
    def run(self, model: onnx.ModelProto, ctx: StepContext) -> StepOutput: ...


def build(step: PipelineStep) -> Step:
    """The step object for one entry of spec.pipeline."""
    from edgeslim.compressor import distill, prune, quantize, simplify

    registry: dict[str, Callable[..., Step]] = {
        "simplify": simplify.Simplify,
        "prune": prune.Prune,
        "distill": distill.Distill,
        "quantize": quantize.Quantize,
    }
    return registry[step.type](step.config)


def run_recorded(
    entry: PipelineStep, model: onnx.ModelProto, before: ModelFigures, ctx: StepContext
) -> tuple[onnx.ModelProto, StepRecord]:
    """Run one pipeline entry on `model` (whose figures are `before`) and record it:
    the new model, and what the manifest says of the step (figures after, time, notes)."""
    from edgeslim.compressor import graph

    began = time.perf_counter()
    out = build(entry).run(model, ctx)
    after = graph.figures(out.model.SerializeToString(), out.model)
    return out.model, StepRecord(
        type=entry.type,
        config=entry.config.wire(),
        before=before,
        after=after,
        seconds=round(time.perf_counter() - began, 3),
        changed=after.sha256 != before.sha256,
        grew=after.size_bytes > before.size_bytes,
        notes=out.notes,
    )


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)
