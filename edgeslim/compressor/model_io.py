"""Loading source models safely: ONNX (fully checked) and TorchScript; never pickles.

A pickled PyTorch checkpoint (`torch.save(model)`, a `.pt`/`.pth`/`.bin` file)
is refused: unpickling it runs whatever code its author put in it. A TorchScript
archive is a program too (`torch.jit.load` runs its `__setstate__`, export runs
its ops, and ops like `torch.from_file` read and write files), so it is refused
unless the spec opts in with `allowModelCode: true`; then it is turned into ONNX
once, at load time, in a confined child process (see `sandbox`), so every step
after that sees one format and none of the model's code runs in this process.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx

from edgeslim.errors import BadInput

PICKLE_ADVICE = (
    "it is a pickled PyTorch checkpoint, and unpickling runs arbitrary code, so edgeslim "
    "refuses it. Export the model instead: torch.onnx.export(model, example, 'model.onnx') "
    "(or torch.jit.script(model).save('model.pt') with source.allowModelCode: true), and "
    "point source.uri at that file"
)


#: A TorchScript or torch.save archive holds one entry per tensor storage plus its
#: code and pickles: tens of thousands is already far beyond a real model.
MAX_ARCHIVE_ENTRIES = 65_536
#: Its central directory (~100 bytes an entry), bounded before zipfile reads it whole.
MAX_ARCHIVE_DIRECTORY_BYTES = 16 * 1024 * 1024
# What zipfile raises on a malformed archive (the ONNX parser then names the file's fault).
_BAD_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error)


def sniff(path: Path, where: str | None = None) -> str:
    """'onnx', 'torchscript' or 'pickle', from the file's content, not its name.

    A zip's central directory is bounded from its end record before zipfile
    lists it (zipfile reads it whole and builds an object per entry), so a
    crafted archive with millions of entries is BadInput, not unbounded memory.
    """
    from edgeslim.compressor import npz

    with path.open("rb") as f:
        head = f.read(4)
        if head[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO
            return "pickle"
        if head != b"PK\x03\x04":
            return "onnx"
        try:
            declared = npz.zip_directory(f)
        except _BAD_ZIP:
            return "onnx"  # let the ONNX parser produce the error
    if declared is None:
        return "onnx"
    entries, directory = declared
    if entries > MAX_ARCHIVE_ENTRIES or directory > MAX_ARCHIVE_DIRECTORY_BYTES:
        raise BadInput(
            f"{where or path}: the zip archive declares {entries} entries in a "
            f"{directory}-byte directory; a model archive holds at most "
            f"{MAX_ARCHIVE_ENTRIES} entries in {MAX_ARCHIVE_DIRECTORY_BYTES} bytes"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except _BAD_ZIP:
        return "onnx"  # let the ONNX parser produce the error
    if any("/code/" in n for n in names):
        return "torchscript"
    return "pickle"  # torch.save's zip format: data.pkl + tensors, no code/


def _check_external_data(model: onnx.ModelProto, base: Path, where: str) -> None:
    """External tensor files must stay inside the model's folder (no ../ or absolute paths)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from edgeslim.compressor.graph import iter_graphs

    root = base.resolve()
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if not uses_external_data(tensor):
                continue
            location = ExternalDataInfo(tensor).location
            target = (root / location).resolve()
            if Path(location).is_absolute() or not target.is_relative_to(root):
                raise BadInput(
                    f"{where}: external data {location!r} of tensor {tensor.name!r} points "
                    "outside the model's folder"
                )
            if not target.is_file():
                raise BadInput(
                    f"{where}: external data file {location!r} of tensor {tensor.name!r} is missing"
                )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_onnx(
    path: Path, where: str, example: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A model every later step can trust, or BadInput naming what is wrong with the file.

    In order: it parses; external data stays in its folder; every stored
    tensor holds the bytes its dims declare, within the per-tensor limit; the
    full checker passes; no statically known tensor exceeds the limit; its
    inputs are tensors; onnxruntime builds a session from it and, given an
    `example` (the first evaluation sample), runs it once. Each failure
    here comes from the file, so each is BadInput; MemoryError is left alone,
    since the size checks exist to make it impossible and it should stay visible.
    """
    from edgeslim.compressor import evaluate, tensor_sizes

    try:
        model = onnx.load(str(path), load_external_data=False)
    except MemoryError:
        raise
    except Exception as exc:  # protobuf and onnx raise several types on a malformed file
        raise BadInput(f"{where}: not a valid ONNX file ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise BadInput(f"{where}: not a valid ONNX model (the graph has no nodes)")
    _check_external_data(model, path.parent, where)
    tensor_sizes.check_stored(model, where)  # declared sizes, before external data is read
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{where}: cannot read its external data ({_first_line(exc)})") from exc
    tensor_sizes.check_stored(model, where)  # and the bytes each now holds
    try:
        # check_model(full_check=True) is this pair; the inferred copy is kept for the size check.
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except MemoryError:
        raise
    except Exception as exc:  # ValidationError, InferenceError, and whatever else a bad file hits
        raise BadInput(f"{where}: ONNX check failed: {_first_line(exc)}") from exc
    tensor_sizes.check_inferred(inferred, where)
    del inferred
    _check_inputs(model, where)
    sess = evaluate.session(model, where=where)  # onnxruntime's load checks (ops, kernels)
    if example is not None:
        _trial_run(sess, model, example, where)
    return model


def _trial_run(sess, model: onnx.ModelProto, example: dict[str, np.ndarray], where: str) -> None:
    """One run on the first evaluation sample: a model that loads but cannot run
    (a Conv with group 0) fails here, named, not inside the evaluation."""
    from edgeslim.compressor import datasets, evaluate

    try:
        feed = datasets.bind(example, model, where).batch(0, 1)
    except BadInput:
        return  # the dataset pre-flight reports the mismatch, naming the spec field
    evaluate.run(sess, feed, where)


def _check_inputs(model: onnx.ModelProto, where: str) -> None:
    """Graph inputs are what the .npz feeds: they must be tensors of a known type."""
    from edgeslim.compressor import tensor_sizes

    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        kind = inp.type.WhichOneof("value")
        if (
            kind != "tensor_type"
            or tensor_sizes.element_bits(inp.type.tensor_type.elem_type) is None
        ):
            raise BadInput(
                f"{where}: input {inp.name!r} is not a numeric tensor ({kind or 'no type'}); "
                "edgeslim feeds model inputs from .npz arrays"
            )


MODEL_CODE_ADVICE = (
    "it is a TorchScript archive, and loading and converting one runs the model's own "
    "code, so edgeslim refuses it by default. Export it to ONNX (torch.onnx.export) and "
    "point the uri at that, or set allowModelCode: true on this source to run its code "
    "inside edgeslim's sandbox"
)


def load_torchscript(path: Path, where: str, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    """TorchScript -> ONNX in a confined child process, traced with one batch of the
    evaluation data as example input.

    What comes back was written by the model's code, so it goes through every
    check an ONNX source does (from a folder of our own: any external data it
    names is missing there, so refused).
    """
    import tempfile

    from edgeslim.compressor import sandbox

    data = sandbox.torchscript_to_onnx(path, where, example)
    with tempfile.TemporaryDirectory(prefix="edgeslim-converted-") as tmp:
        converted = Path(tmp) / "model.onnx"
        converted.write_bytes(data)
        del data
        return load_onnx(converted, where)


def load_model(
    path: Path,
    where: str,
    example: dict[str, np.ndarray] | None = None,
    *,
    allow_model_code: bool = False,
) -> onnx.ModelProto:
    """A checked ONNX model from an ONNX or TorchScript file; BadInput for anything else.

    A TorchScript file is refused unless `allow_model_code` (the source's
    `allowModelCode`) says its code may run, confined, in a child process.
    """
    kind = sniff(path, where)
    if kind == "pickle":
        raise BadInput(f"{where}: {PICKLE_ADVICE}")
    if kind == "torchscript":
        if not allow_model_code:
            raise BadInput(f"{where}: {MODEL_CODE_ADVICE}")
        if example is None:
            raise BadInput(f"{where}: a TorchScript model needs the evaluation dataset to trace it")
        return load_torchscript(path, where, example)
    return load_onnx(path, where, example)


def read_npz_example(path: Path, where: str | None = None) -> dict[str, np.ndarray]:
    """The first sample of every input array of an .npz (labels dropped), for tracing.

    The same checked reader as the datasets (sizes before reading, no object
    arrays), reading one row of each array; a scalar array is BadInput.
    """
    from edgeslim.compressor.datasets import LABELS, read

    where = where or str(path)
    arrays = read(path, where, rows=1, skip={LABELS})
    for name, array in arrays.items():
        if array.ndim == 0:
            raise BadInput(f"dataset {where}: array {name!r} is a scalar; first axis = samples")
    return arrays
