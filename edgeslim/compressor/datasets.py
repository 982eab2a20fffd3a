"""Evaluation / training data: `.npz` files bound to a model's inputs.

One array per model input, named after it (a single-input model may use `x`),
first axis = samples, plus optional labels `y`. Files are read by
`edgeslim.compressor.npz`, which checks every declared size against the limits
before inflating anything and refuses pickled object arrays (unpickling an
untrusted file runs arbitrary code) without unpickling them.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edgeslim.compressor.npz import read_npz
from edgeslim.errors import BadInput

LABELS = "y"


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str | None, ...]
    """Static dims as ints, symbolic ones as their names (None when unnamed)."""
    dtype: np.dtype

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}[{dims}] {self.dtype}"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        specs.append(
            InputSpec(inp.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
        )
    return specs


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int | None) -> Dataset:
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.source)

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}


def load(path: Path, model: onnx.ModelProto, source: str | None = None) -> Dataset:
    """Read an .npz and check it fits `model`'s inputs; BadInput says what does not."""
    where = source or str(path)
    return bind(read(path, where), model, where)


def read(
    path: Path, where: str, *, rows: int | None = None, skip: Container[str] = ()
) -> dict[str, np.ndarray]:
    """Every array of an .npz by name (only the first `rows` rows with `rows`; `skip` unread).

    Sizes are checked before reading and object arrays refused (see
    `edgeslim.compressor.npz`); BadInput names the file and the problem.
    """
    return read_npz(path, where, rows=rows, skip=skip)


def bind(arrays: dict[str, np.ndarray], model: onnx.ModelProto, where: str) -> Dataset:
    """The arrays as `model`'s inputs (and labels); `arrays` itself is left as it was."""
    specs = model_inputs(model)
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    if len(specs) == 1 and specs[0].name not in arrays and set(arrays) == {"x"}:
        arrays = {specs[0].name: arrays["x"]}
    expected = ", ".join(s.describe() for s in specs)
    found = ", ".join(f"{k}{list(v.shape)} {v.dtype}" for k, v in arrays.items()) or "nothing"
    missing = [s.name for s in specs if s.name not in arrays]
    extra = [k for k in arrays if k not in {s.name for s in specs}]
    if missing or extra:
        raise BadInput(
            f"dataset {where} does not fit the model: expected {expected}"
            f"{' (x for a single input)' if len(specs) == 1 else ''}, found {found}"
        )
    bound: dict[str, np.ndarray] = {}
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        if (
            arr.ndim == 0
            or arr.ndim != len(spec.shape)
            or any(
                isinstance(d, int) and d > 0 and d != got
                for i, (d, got) in enumerate(zip(spec.shape, arr.shape, strict=False))
                if i > 0
            )
        ):
            raise BadInput(
                f"dataset {where}: input {spec.name!r} has shape {list(arr.shape)}, "
                f"the model expects {spec.describe()} (first axis = samples)"
            )
        if arr.dtype != spec.dtype:
            if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                arr = arr.astype(spec.dtype)
            else:
                raise BadInput(
                    f"dataset {where}: input {spec.name!r} is {arr.dtype}, "
                    f"the model expects {spec.dtype}"
                )
        bound[spec.name] = arr
        counts.add(len(arr))
    if labels is not None:
        # One label per sample: the metrics compare them with one argmax per sample.
        if labels.ndim == 0 or labels.size != len(labels):
            raise BadInput(
                f"dataset {where}: labels {LABELS} have shape {list(labels.shape)}; "
                "expected one label per sample"
            )
        counts.add(len(labels))
    if len(counts) != 1 or 0 in counts:
        raise BadInput(
            f"dataset {where}: arrays disagree on the number of samples or are empty: {found}"
        )
    return Dataset(bound, labels, where)
