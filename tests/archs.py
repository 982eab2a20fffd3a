"""Exporting torch modules to ONNX the way third-party files are made
(TorchScript exporter, a fixed opset, dynamic batch and sequence axes), for
the tests that run real architectures, and the digits example's builder."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from types import ModuleType

import onnx
import torch

DIGITS_BUILD = Path(__file__).resolve().parent.parent / "examples" / "digits" / "build.py"


def digits_build() -> ModuleType:
    """examples/digits/build.py as a module (it is a script, not a package):
    DigitsCNN, export and reexport."""
    spec = importlib.util.spec_from_file_location("digits_build", DIGITS_BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(module: torch.nn.Module, args: tuple, names: list[str], opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in [*names, "output"]}
    if "input_ids" in names:  # sequence length too
        dynamic = {**{n: {0: "batch", 1: "seq"} for n in names}, "output": {0: "batch"}}
    torch.onnx.export(
        module.eval(),
        args,
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=names,
        output_names=["output"],
        dynamic_axes=dynamic,
    )
    return onnx.load_from_string(buf.getvalue())
