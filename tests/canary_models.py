"""Artifacts for canary tests: one that answers exactly like the digits model under
other bytes, and one whose output classes are permuted (it loads, is fast and
answers with confidence, but names the wrong digit)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def same_answers(model: onnx.ModelProto) -> bytes:
    """The model under other bytes (another sha256), answering identically."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.doc_string = "canary: same weights, other bytes"
    return copy.SerializeToString()


def permuted_classes(model: onnx.ModelProto, shift: int = 1) -> bytes:
    """The model with its last Gemm's output rows rolled by `shift`: class i's
    score is computed by class i+shift's weights, so top-1 moves to another class."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    gemm = [n for n in copy.graph.node if n.op_type == "Gemm"][-1]
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    inits = {t.name: t for t in copy.graph.initializer}
    weight = numpy_helper.to_array(inits[gemm.input[1]])
    axis = 0 if trans_b else 1  # the axis of the output classes
    inits[gemm.input[1]].CopyFrom(
        numpy_helper.from_array(np.roll(weight, shift, axis=axis), gemm.input[1])
    )
    if len(gemm.input) > 2 and gemm.input[2] in inits:
        bias = numpy_helper.to_array(inits[gemm.input[2]])
        inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(np.roll(bias, shift), gemm.input[2]))
    return copy.SerializeToString()
