"""Graph clean-up with onnxslim: constant folding, dead-node removal, fusion.

Why onnxslim rather than onnxruntime's offline optimiser: onnxruntime's
extended/all levels write fused `com.microsoft` operators that only
onnxruntime runs (and only the version that wrote them), while onnxslim keeps
the graph in standard ONNX ops, so the artifact stays portable to any edge
runtime and later steps (prune, quantize) still see ordinary Conv/Gemm nodes.
"""

from __future__ import annotations

from collections import Counter

import onnx

from edgeslim.api.spec import SimplifyConfig
from edgeslim.compressor.graph import constants_to_initializers, merge_duplicate_initializers
from edgeslim.compressor.shape_inference import infer_symbolic_shapes
from edgeslim.compressor.steps import StepContext, StepOutput


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim on `model`, with the tensor shapes worked out first.

    onnxslim folds `Shape` over fixed dims only where it knows the shapes, and
    its own copy of onnxruntime's symbolic shape inference fails on opset-17
    LayerNormalization graphs (onnxslim 0.1.98: an unbound local in
    `onnx_infer_single_node`); it then falls back to ONNX's inference, which
    loses the dims behind every computed Reshape target, and a SegFormer at
    opset 17 kept 41 Shape nodes (4 at opset 14). onnxruntime's own symbolic
    inference, run first (in a child, with a deadline), gives it the shapes (4
    left at 17 too); where that fails or takes too long, onnxslim infers alone."""
    import onnxslim

    return onnxslim.slim(infer_symbolic_shapes(model) or model)


class Simplify:
    def __init__(self, config: SimplifyConfig) -> None:
        self.config = config

    def run(self, model: onnx.ModelProto, ctx: StepContext) -> StepOutput:
        before = Counter(n.op_type for n in model.graph.node)
        slimmed = slim(model)
        converted = constants_to_initializers(slimmed)
        merged = merge_duplicate_initializers(slimmed)
        after = Counter(n.op_type for n in slimmed.graph.node)
        removed = {
            op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)
        }
        notes = [f"nodes {sum(before.values())} -> {sum(after.values())}"]
        if removed:
            notes.append("removed " + ", ".join(f"{n} {op}" for op, n in sorted(removed.items())))
        if converted:
            notes.append(f"{converted} Constant nodes turned into initializers")
        if merged:
            notes.append(f"{merged} initializers equal to another merged into it (shared)")
        # onnxslim writes the shapes it inferred into the graph: a small model can come
        # out a little larger than it went in, which the step table flags as "grew".
        shapes = _value_info_bytes(slimmed) - _value_info_bytes(model)
        if shapes > 0:
            notes.append(
                f"recorded the shapes of {len(slimmed.graph.value_info)} tensors "
                f"(value_info, {shapes:,} bytes)"
            )
        return StepOutput(model=slimmed, notes=notes)


def _value_info_bytes(model: onnx.ModelProto) -> int:
    holder = onnx.GraphProto()  # as serialised: each entry's tag and length included
    holder.value_info.extend(model.graph.value_info)
    return holder.ByteSize()
