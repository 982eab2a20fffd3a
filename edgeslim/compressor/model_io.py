"""Loading source models safely: ONNX (fully checked) and TorchScript; never pickles.

A pickled PyTorch checkpoint (`torch.save(model)`, a `.pt`/`.pth`/`.bin` file)
is refused: unpickling it runs whatever code its author put in it. TorchScript
archives are loaded with `torch.jit.load`, whose loader rebuilds only tensors
and TorchScript objects, and are turned into ONNX once, at load time, so every
step after that sees one format.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from edgeslim.errors import BadInput

PICKLE_ADVICE = (
    "it is a pickled PyTorch checkpoint, and unpickling runs arbitrary code, so edgeslim "
    "refuses it. Export the model instead: torch.onnx.export(model, example, 'model.onnx') "
    "or torch.jit.script(model).save('model.pt'), and point source.uri at that file"
)


def sniff(path: Path) -> str:
    """'onnx', 'torchscript' or 'pickle', from the file's content, not its name."""
    with path.open("rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO
        return "pickle"
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "onnx"  # let the ONNX parser produce the error
        if any("/code/" in n for n in names):
            return "torchscript"
        return "pickle"  # torch.save's zip format: data.pkl + tensors, no code/
    return "onnx"


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


def load_onnx(path: Path, where: str) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{where}: not a valid ONNX file ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise BadInput(f"{where}: not a valid ONNX model (the graph has no nodes)")
    _check_external_data(model, path.parent, where)
    onnx.load_external_data_for_model(model, str(path.parent))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{where}: ONNX check failed: {first}") from exc
    return model


def load_torchscript(path: Path, where: str, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    """TorchScript -> ONNX, traced with one batch of the evaluation data as example input."""
    import io

    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as exc:
        raise BadInput(f"{where}: not a loadable TorchScript archive ({exc})") from exc
    names = list(example)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                args,
                buffer,
                input_names=names,
                output_names=["output"],
                dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as exc:
            raise BadInput(
                f"{where}: TorchScript model could not be converted to ONNX: {exc}"
            ) from exc
    return onnx.load_from_string(buffer.getvalue())


def load_model(
    path: Path, where: str, example: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A checked ONNX model from an ONNX or TorchScript file; BadInput for anything else."""
    kind = sniff(path)
    if kind == "pickle":
        raise BadInput(f"{where}: {PICKLE_ADVICE}")
    if kind == "torchscript":
        if example is None:
            raise BadInput(f"{where}: a TorchScript model needs the evaluation dataset to trace it")
        return load_torchscript(path, where, example)
    return load_onnx(path, where)


def read_npz_example(path: Path) -> dict[str, np.ndarray]:
    """The first sample of every input array of an .npz (labels dropped), for tracing."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k][:1] for k in npz.files if k != "y"}
