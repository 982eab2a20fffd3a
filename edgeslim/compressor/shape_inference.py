"""onnxruntime's symbolic shape inference, in a child process with a deadline.

It simplifies every symbolic dim with sympy, which on some graphs runs for tens
of minutes: on torchvision's Faster R-CNN (fasterrcnn_mobilenet_v3_large_320_fpn,
opset 17) it was still in `_infer_Slice` after 25 minutes, where onnxslim alone
takes 3 seconds. A thread cannot be stopped, so the inference runs in a child
that is killed at the deadline, and the caller goes on without its shapes:
simplify (and the prune step's own shape fold) with onnxslim's inference alone,
quantize's pre-processing without the symbolic pass, split with onnx's
inference.

Run as `python -m edgeslim.compressor.shape_inference IN OUT`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

# Seconds the child may take. Graphs it handles take seconds (a SegFormer at
# opset 17: under 2 s plus the child's start).
DEADLINE_SECONDS = 60.0


def infer_symbolic_shapes(
    model: onnx.ModelProto, deadline: float | None = None
) -> onnx.ModelProto | None:
    """`model` with the shapes onnxruntime's symbolic inference finds, or None when
    it fails or runs past `deadline` (default DEADLINE_SECONDS): custom domains,
    > 2 GB, sympy blow-ups."""
    with tempfile.TemporaryDirectory(prefix="edgeslim-shapes-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        try:
            src.write_bytes(model.SerializeToString())
        except ValueError:  # over protobuf's 2 GB
            return None
        return onnx.load(str(dst)) if infer_file(src, dst, deadline) else None


def infer_file(src: Path, dst: Path, deadline: float | None = None) -> bool:
    """Write `src` with its inferred shapes to `dst` (a different file); False when the
    inference fails or runs past `deadline`, and `dst` is then not to be read."""
    try:
        subprocess.run(
            [sys.executable, "-m", __name__, str(src), str(dst)],
            cwd=dst.parent,  # where it saves `sym_shape_infer_temp.onnx` when it gives up
            timeout=DEADLINE_SECONDS if deadline is None else deadline,
            check=True,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def main(argv: list[str]) -> int:
    from edgeslim.compressor import ort_tools

    ort_tools.import_without_torch()
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(onnx.load(argv[0]), auto_merge=True)
    onnx.save(model, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
