"""Fetch, verify and load an ONNX model; check requests against it; run it.

A :class:`LoadedModel` exists only once the artifact is fetched, its sha256
verified and an onnxruntime session built and warmed up, so holding one means
the model can serve: the app never sees a half-loaded model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeslim import storage
from edgeslim.cpus import available_cpus
from edgeslim.errors import BadInput
from edgeslim.serving.protocol import DATATYPES, ORT_TYPES, InferRequest, RequestError, to_array

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime"

# onnxruntime reports errors as exception classes generated in its pybind module.
_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state
# Inputs that satisfy the declared dims can still be inconsistent with each other
# (two inputs with different batch sizes): onnxruntime says InvalidArgument, or
# Fail from the kernel that trips over it. Both answer 400 with onnxruntime's
# message; a model broken for *every* input shows up just as clearly that way.
_CLIENT_ORT_ERRORS: tuple[type[Exception], ...] = (_ORT_ERRORS.InvalidArgument, _ORT_ERRORS.Fail)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output as the protocol describes it (-1 marks a dynamic dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_ort(cls, arg: Any) -> TensorSpec:
        datatype = ORT_TYPES.get(arg.type)
        if datatype is None:
            raise BadInput(f"model tensor {arg.name!r} has type {arg.type}, which cannot be served")
        # Symbolic ("batch") and unknown (None) dims are both dynamic for a client.
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        return cls(arg.name, datatype, shape)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.datatype} {list(self.shape)}"


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a small, possibly shared edge CPU.

    ``threads`` sets intra-op parallelism; 0 means the CPUs this container may
    use (:func:`~edgeslim.cpus.available_cpus`), not onnxruntime's own
    default of every core on the node. Inter-op is 1 and execution sequential:
    these models are small chains where parallel branches do not pay for the
    extra threads.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads spin by default, burning CPU between requests that a
    # small edge box (or the other containers on it) needs more.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    return opts


class LoadedModel:
    """A ready onnxruntime session plus what the protocol says about it."""

    def __init__(self, name: str, path: Path, sha256: str, threads: int) -> None:
        self.name = name
        self.path = path
        self.sha256 = sha256
        # The content hash is the version: two pods serving the same bytes agree on it.
        self.version = sha256[:12]
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # protobuf, graph or kernel errors: the file is not usable
            message = " ".join(str(exc).split())
            raise BadInput(f"model file {path}: onnxruntime cannot load it: {message}") from exc
        self.inputs = [TensorSpec.from_ort(a) for a in self.session.get_inputs()]
        self.outputs = [TensorSpec.from_ort(a) for a in self.session.get_outputs()]
        self._inputs = {t.name: t for t in self.inputs}
        self._outputs = {t.name: t for t in self.outputs}
        self._all_outputs = [t.name for t in self.outputs]
        #: Seconds a single-sample run took at warm-up; the app uses it to decide
        #: whether a request may run on the event loop or needs a worker thread.
        self.warmup_seconds = self._warm_up()

    def _warm_up(self) -> float:
        """Runs one zero-filled sample so the first real request doesn't pay for allocation.

        Best effort: a model whose dynamic dims need particular values may
        reject zeros of size 1, which says nothing about real requests.
        """
        feed = {}
        for spec in self.inputs:
            shape = tuple(1 if d < 0 else d for d in spec.shape)
            dtype = DATATYPES[spec.datatype]
            feed[spec.name] = np.zeros(shape, dtype=str if dtype.kind == "O" else dtype)
        try:
            self.session.run(None, feed)  # the first run allocates; not timed
            # The fastest of a few: one run on a busy machine must not brand a fast
            # model slow (that would send every request through a thread for good).
            best = math.inf
            for _ in range(5):
                start = time.perf_counter()
                self.session.run(None, feed)
                best = min(best, time.perf_counter() - start)
            return best
        except Exception as exc:
            log.warning("warm-up run of %s failed (serving anyway): %s", self.name, exc)
            return math.inf

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def feed(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Request tensors checked against the model and converted; RequestError otherwise."""
        feed: dict[str, np.ndarray] = {}
        for tensor in request.inputs:
            spec = self._inputs.get(tensor.name)
            if spec is None:
                raise RequestError(
                    f"unknown input {tensor.name!r}; the model's inputs are "
                    + ", ".join(f"{t.name!r} ({t.describe()})" for t in self.inputs)
                )
            if tensor.datatype != spec.datatype:
                raise RequestError(
                    f"input {tensor.name!r}: datatype {tensor.datatype} does not match the "
                    f"model's {spec.datatype}"
                )
            if not _shape_fits(tensor.shape, spec.shape):
                raise RequestError(
                    f"input {tensor.name!r}: shape {list(tensor.shape)} does not match the "
                    f"model's {list(spec.shape)} (-1 = any size)"
                )
            feed[tensor.name] = to_array(tensor)
        missing = [t for t in self.inputs if t.name not in feed]
        if missing:
            raise RequestError(
                "missing input " + ", ".join(f"{t.name!r} ({t.describe()})" for t in missing)
            )
        return feed

    def output_names(self, requested: list[str] | None) -> list[str]:
        if not requested:
            return self._all_outputs
        for name in requested:
            if name not in self._outputs:
                raise RequestError(
                    f"unknown output {name!r}; the model's outputs are "
                    + ", ".join(repr(n) for n in self._all_outputs)
                )
        return requested

    def run(self, feed: dict[str, np.ndarray], names: list[str]) -> list[tuple[str, str, Any]]:
        """``(name, v2 datatype, array)`` per requested output.

        onnxruntime releases the GIL while it computes, so this may run in a
        worker thread while the event loop keeps answering probes.
        """
        try:
            arrays = self.session.run(names, feed)
        except _CLIENT_ORT_ERRORS as exc:
            message = " ".join(str(exc).split())
            raise RequestError(f"the model rejected the inputs: {message}") from None
        return [(n, self._outputs[n].datatype, a) for n, a in zip(names, arrays, strict=True)]


def _shape_fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if len(shape) != len(declared):
        return False
    return all(d == -1 or d == s for s, d in zip(shape, declared, strict=True))


def load(uri: str, name: str, *, workdir: Path, sha256: str | None, threads: int) -> LoadedModel:
    """Fetches ``uri`` (s3://, file:// or a path), checks its sha256, builds the session.

    Raises BadInput (wrong sha, missing object, corrupt file: retrying won't
    help) or StorageUnavailable (the store may come back: worth a retry).
    """
    path = storage.fetch(uri, workdir, sha256=sha256, what="model")
    # fetch verified the expected hash while streaming; without one we still want
    # the content hash for the version and the info metric, so hash the file.
    digest = sha256.strip().lower().removeprefix("sha256:") if sha256 else storage.sha256_file(path)
    return LoadedModel(name, path, digest, threads)
