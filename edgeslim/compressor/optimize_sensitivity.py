"""Quantization sensitivity: which parts of the graph break the gate when quantized.

One static QDQ model is built (calibrated once). The unit measured is a
*region*: a computing node (MatMul, Conv, Softmax, LayerNorm, a residual Add)
together with the ops its output flows through unchanged in kind — layout ops
(Reshape, Transpose, ...) and elementwise ops with a constant operand (a bias
Add, a scale Mul) — up to the nodes that compute with it next. QDQ shares one
quantized copy of a tensor among its readers and re-quantizes it after every
such op, so one node alone in float gains little when its output carries an
outlier channel: the whole region must stay float.

For each region, a copy of the QDQ model whose region tensors bypass their
QuantizeLinear/DequantizeLinear pairs runs on a slice of the evaluation data;
the share of the quantized model's output error that disappears is the
region's sensitivity. No recalibration and no new quantization per region: a
graph edit and one small inference pass each. Keeping a region float in a
real quantize step means excluding its nodes (`NodeSensitivity.nodes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeslim.api.result import NodeSensitivity
from edgeslim.compressor import evaluate
from edgeslim.compressor.datasets import Dataset

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Ops that move or select values without computing with them.
LAYOUT_OPS = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split",
    "Slice", "Concat", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
    "MaxPool", "Resize",
}  # fmt: skip
# Elementwise ops that only shift or scale a tensor when their other operand is constant.
CONST_ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div"}


@dataclass
class Region:
    root: onnx.NodeProto
    tensors: list[str]
    """Activations that stay float."""
    nodes: list[str]
    """Nodes kept float to keep them so: the root, the ops in between, the readers at the end."""


def _output_error(model: onnx.ModelProto, data: Dataset, reference: np.ndarray) -> float:
    out = evaluate.run_batched(evaluate.session(model), data)
    flat, ref = out.reshape(len(out), -1), reference.reshape(len(reference), -1)
    return float(np.mean((flat - ref) ** 2) / max(float(np.mean(ref**2)), 1e-12))


class _Graph:
    """Readers and writers of a QDQ graph, seen through its Q/DQ pairs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {t.name for t in model.graph.initializer}
        self.writer = {o: n for n in model.graph.node for o in n.output}
        self.raw_readers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.raw_readers.setdefault(i, []).append(n)

    def quantized(self, tensor: str) -> bool:
        return any(r.op_type == "QuantizeLinear" for r in self.raw_readers.get(tensor, []))

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """Compute nodes reading `tensor`, directly or through its Q/DQ pair."""
        found = []
        for r in self.raw_readers.get(tensor, []):
            if r.op_type == "QuantizeLinear":
                for dq in self.raw_readers.get(r.output[0], []):
                    found += [x for x in self.raw_readers.get(dq.output[0], [])]
            elif r.op_type != "DequantizeLinear":
                found.append(r)
        return found

    def constant(self, name: str) -> bool:
        """An initializer, or the dequantized copy of one (a quantized bias or scale)."""
        if name in self.inits:
            return True
        w = self.writer.get(name)
        return w is not None and w.op_type == "DequantizeLinear" and w.input[0] in self.inits

    def passes_through(self, node: onnx.NodeProto) -> bool:
        if node.op_type in LAYOUT_OPS:
            return True
        return node.op_type in CONST_ELEMENTWISE_OPS and any(self.constant(i) for i in node.input)


def regions(qdq: onnx.ModelProto) -> list[Region]:
    """One region per computing node whose output QDQ quantizes."""
    g = _Graph(qdq)
    found = []
    for root in qdq.graph.node:
        if root.op_type in QDQ_OPS or g.passes_through(root):
            continue
        outputs = [o for o in root.output if g.quantized(o)]
        if not outputs:
            continue
        tensors, nodes, todo = [], [root.name], list(outputs)
        while todo:
            tensor = todo.pop()
            if tensor in tensors:
                continue
            tensors.append(tensor)
            for r in g.readers(tensor):
                if r.name not in nodes:
                    nodes.append(r.name)
                if g.passes_through(r):
                    todo += list(r.output)
        found.append(Region(root, tensors, nodes))
    return found


def float_region(qdq: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `qdq` in which every reader of `tensors` gets the float tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    g = _Graph(out)
    for tensor in tensors:
        for q in g.raw_readers.get(tensor, []):
            if q.op_type != "QuantizeLinear":
                continue
            for dq in g.raw_readers.get(q.output[0], []):
                for reader in g.raw_readers.get(dq.output[0], []):
                    for i, name in enumerate(reader.input):
                        if name == dq.output[0]:
                            reader.input[i] = tensor
    return out


def analyse(
    qdq: onnx.ModelProto,
    source: onnx.ModelProto,
    data: Dataset,
    reference: np.ndarray,
) -> list[NodeSensitivity]:
    """Every region's sensitivity, most sensitive first (regions the source cannot name
    in excludeNodes are left out)."""
    full = _output_error(qdq, data, reference)
    source_nodes = {n.name for n in source.graph.node if n.name}
    found = []
    for region in regions(qdq):
        nodes = [n for n in region.nodes if n in source_nodes]
        if not nodes:
            continue
        try:
            err = _output_error(float_region(qdq, region.tensors), data, reference)
        except (ValueError, *evaluate.runtime_errors()):
            continue  # a bypass onnxruntime refuses (a type it cannot take float)
        recovery = (full - err) / full if full > 0 else 0.0
        found.append(
            NodeSensitivity(
                node=region.root.name,
                op_type=region.root.op_type,
                tensor=region.tensors[0],
                recovery=round(recovery, 4),
                nodes=nodes,
            )
        )
    found.sort(key=lambda s: -s.recovery)
    return found
