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
from edgeslim.compressor.graph import constants_to_initializers
from edgeslim.compressor.steps import StepContext, StepOutput


class Simplify:
    def __init__(self, config: SimplifyConfig) -> None:
        self.config = config

    def run(self, model: onnx.ModelProto, ctx: StepContext) -> StepOutput:
        import onnxslim

        before = Counter(n.op_type for n in model.graph.node)
        slimmed = onnxslim.slim(model)
        converted = constants_to_initializers(slimmed)
        after = Counter(n.op_type for n in slimmed.graph.node)
        removed = {
            op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)
        }
        notes = [f"nodes {sum(before.values())} -> {sum(after.values())}"]
        if removed:
            notes.append("removed " + ", ".join(f"{n} {op}" for op, n in sorted(removed.items())))
        if converted:
            notes.append(f"{converted} Constant nodes turned into initializers")
        return StepOutput(model=slimmed, notes=notes)
