"""Quantization sensitivity: which activations break the gate when quantized.

One static QDQ model is built (calibrated once); then, for each quantized
activation, a copy in which that tensor's QuantizeLinear/DequantizeLinear pair
is bypassed (its readers get the float tensor) runs on a slice of the
evaluation data. The share of the quantized model's output error that
disappears is the tensor's sensitivity. No recalibration and no new
quantization per tensor: a graph edit and one small inference pass each,
which keeps it affordable for a fleet.

Tensors rather than nodes, because QDQ shares one quantized copy of a tensor
among all its readers and passes it through layout ops (Reshape, Transpose):
keeping one reader in float barely helps when the tensor itself carries an
outlier channel. Keeping a tensor float in a real quantize step means
excluding its writer and its readers (`NodeSensitivity.nodes`).
"""

from __future__ import annotations

import numpy as np
import onnx

from edgeslim.api.result import NodeSensitivity
from edgeslim.compressor import evaluate
from edgeslim.compressor.datasets import Dataset

# Ops that move or select values without computing: QDQ passes one quantized copy
# through them, so a tensor stays float only if the chain of them stays float.
LAYOUT_OPS = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split",
    "Slice", "Concat", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
    "MaxPool", "Resize",
}  # fmt: skip


def _output_error(model: onnx.ModelProto, data: Dataset, reference: np.ndarray) -> float:
    out = evaluate.run_batched(evaluate.session(model), data)
    flat, ref = out.reshape(len(out), -1), reference.reshape(len(reference), -1)
    return float(np.mean((flat - ref) ** 2) / max(float(np.mean(ref**2)), 1e-12))


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            found.setdefault(i, []).append(n)
    return found


def quantized_activations(qdq: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes of activations (not of weights, which are initializers)."""
    inits = {t.name for t in qdq.graph.initializer}
    return [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


def float_tensor(qdq: onnx.ModelProto, q_name: str) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `qdq` whose quantized tensor (at QuantizeLinear `q_name`) stays float,
    and the names of the nodes that read it."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    readers = _readers(out)
    q = next(n for n in out.graph.node if n.name == q_name)
    tensor = q.input[0]
    touched: list[str] = []
    for dq in readers.get(q.output[0], []):
        if dq.op_type != "DequantizeLinear":
            continue
        for reader in readers.get(dq.output[0], []):
            for i, name in enumerate(reader.input):
                if name == dq.output[0]:
                    reader.input[i] = tensor
            touched.append(reader.name)
    return out, touched


def analyse(
    qdq: onnx.ModelProto,
    source: onnx.ModelProto,
    data: Dataset,
    reference: np.ndarray,
) -> list[NodeSensitivity]:
    """Every quantized activation's sensitivity, most sensitive first."""
    full = _output_error(qdq, data, reference)
    source_nodes = {n.name for n in source.graph.node if n.name}
    writer = {o: n for n in qdq.graph.node for o in n.output}
    found = []
    for q in quantized_activations(qdq):
        try:
            variant, readers = float_tensor(qdq, q.name)
            err = _output_error(variant, data, reference)
        except (ValueError, StopIteration, *evaluate.runtime_errors()):
            continue  # a bypass onnxruntime refuses: not a candidate
        producer = writer.get(q.input[0])
        chain = _layout_chain(qdq, q.input[0], writer)
        nodes = [n for n in ([producer.name] if producer is not None else []) + readers + chain]
        nodes = [n for n in nodes if n in source_nodes]
        if not nodes:
            continue  # only nodes the source has can be named in excludeNodes
        recovery = (full - err) / full if full > 0 else 0.0
        found.append(
            NodeSensitivity(
                node=producer.name if producer is not None else q.input[0],
                op_type=producer.op_type if producer is not None else "input",
                tensor=q.input[0],
                recovery=round(recovery, 4),
                nodes=list(dict.fromkeys(nodes)),
            )
        )
    found.sort(key=lambda s: -s.recovery)
    return found


def _layout_chain(
    qdq: onnx.ModelProto, tensor: str, writer: dict[str, onnx.NodeProto]
) -> list[str]:
    """Layout ops the float tensor flows through, up- and downstream, and the compute
    nodes at their far ends: all of them must stay float for the tensor to stay float."""
    readers = _readers(qdq)
    found: list[str] = []
    seen: set[str] = set()

    def plain(name: str) -> str:  # the float tensor behind a DequantizeLinear
        node = writer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            q = writer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return name

    def down(name: str) -> None:
        for r in readers.get(name, []):
            if r.op_type == "QuantizeLinear":
                for dq in readers.get(r.output[0], []):
                    down(dq.output[0])
            elif r.op_type != "DequantizeLinear" and r.name not in seen:
                seen.add(r.name)
                found.append(r.name)
                if r.op_type in LAYOUT_OPS:
                    for o in r.output:
                        down(o)

    def up(name: str) -> None:
        node = writer.get(plain(name))
        if node is None or node.name in seen:
            return
        seen.add(node.name)
        found.append(node.name)
        if node.op_type in LAYOUT_OPS:
            up(node.input[0])

    w = writer.get(tensor)
    if w is not None and w.op_type in LAYOUT_OPS:
        up(w.input[0])
    down(tensor)
    return found
