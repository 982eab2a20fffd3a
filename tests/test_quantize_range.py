"""int8 weights in 7 bits (`reduceRange`): onnxruntime's x86 kernels for uint8
activations times int8 weights saturate on CPUs without VNNI, which cost a
transformer's mixed-precision search every candidate on such a machine (AVX2
only). Unset, it follows the CPU the compressor runs on; set, it is what it says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeslim.compressor.quantize import saturating_int8_cpu
from tests import cli_process
from tests.test_quantize_opsets import EXIT_OK, _check_artifact, _compress, _spec, exported

__all__ = ["exported"]  # the fixture, shared with the opset tests


def int8_weights(artifact: Path) -> np.ndarray:
    model = onnx.load(str(artifact))
    return np.concatenate(
        [
            numpy_helper.to_array(t).reshape(-1).astype(np.int32)
            for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8
        ]
    )


@pytest.mark.parametrize("reduce_range", [True, False, None])
def test_reduce_range_keeps_int8_weights_in_seven_bits(
    digits, exported: dict[int, Path], tmp_path: Path, reduce_range: bool | None
) -> None:
    quantize: dict = {"mode": "static", "calibrationSamples": 64}
    if reduce_range is not None:
        quantize["reduceRange"] = reduce_range
    code, manifest, artifact = _compress(_spec(digits, exported[13], tmp_path, quantize))
    assert code == EXIT_OK
    _check_artifact(digits, artifact, manifest)
    weights = int8_weights(artifact)
    expected = saturating_int8_cpu() if reduce_range is None else reduce_range
    # Symmetric per-channel int8: each channel's largest weight lands on the range's end.
    assert np.abs(weights).max() == (64 if expected else 127)
    notes = manifest["steps"][0]["notes"]
    assert any(n.startswith("weights in 7 bits") for n in notes) == expected, notes


def test_reduce_range_outside_int8_is_refused(digits, exported: dict[int, Path], tmp_path: Path):
    spec = _spec(digits, exported[13], tmp_path, {"mode": "fp16", "reduceRange": True})
    proc = cli_process.compress(spec)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reduceRange applies to modes dynamic and static only" in proc.stderr
    assert "Traceback" not in proc.stderr
