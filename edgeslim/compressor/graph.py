"""Helpers over ONNX graphs that every step needs: walking subgraphs, turning
Constant-node weights into initializers, and measuring a model.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.api.result import ModelFigures

# Ops whose float inputs are weights worth compressing; anything else that is
# an initializer (shapes, axes, scales) is bookkeeping.
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "LSTM", "GRU", "RNN"}


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in If / Loop / Scan attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move tensors held by `Constant` nodes into initializers, in every graph.

    Exporters often write weights as Constant nodes; steps only look at
    initializers, so without this they would silently skip those weights.
    A node the move could make invalid (not exactly one tensor `value`, no
    output name, a name an input or initializer already holds) stays a node:
    the source was checked as it is, and this must never turn a valid graph
    into one the checker or onnxruntime refuses.
    Returns how many nodes were converted.
    """
    converted = 0
    for graph in iter_graphs(model.graph):
        taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        keep = []
        for node in graph.node:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if (
                node.op_type == "Constant"
                and node.domain in ("", "ai.onnx")
                and value is not None
                and value.type == onnx.AttributeProto.TENSOR
                and len(node.attribute) == 1
                and len(node.output) == 1
                and node.output[0]
                and node.output[0] not in taken
            ):
                taken.add(node.output[0])
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value.t)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                converted += 1
            else:
                keep.append(node)
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)
    return converted


def one_value(arr: np.ndarray) -> bool:
    """Whether `arr` repeats one value (or has under two elements): the ones and zeros
    of untrained layers, which exporters merge as equal constants. Such a constant
    read twice is no sign of a shared parameter."""
    return arr.size < 2 or bool(np.all(arr == arr.reshape(-1)[0]))


def merge_duplicate_initializers(model: onnx.ModelProto) -> int:
    """Let the readers of byte-identical initializers of the main graph read one of them.

    onnxslim (0.1.98) writes a copy per reader where an export shared a parameter
    through Identity nodes: ALBERT's layers, run at every depth, came out of the
    simplify step 74% larger (44,288 parameters became 77,056). The same values
    read twice compute the same thing, so merging them back changes nothing but
    the size; it also lets structured pruning see the layers that share a weight.
    Graph inputs (overridable at run time) are left alone, and so are constants of
    one repeated value (`one_value`), which structured pruning would have to copy
    apart again."""
    graph = model.graph
    protected = {i.name for i in graph.input} | {o.name for o in graph.output}
    first: dict[tuple[int, tuple[int, ...], str], str] = {}
    alias: dict[str, str] = {}
    for init in graph.initializer:
        if init.name in protected or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        arr = numpy_helper.to_array(init)
        if one_value(arr):
            continue
        raw = arr.tobytes()
        key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).hexdigest())
        if key in first:
            alias[init.name] = first[key]
        else:
            first[key] = init.name
    if not alias:
        return 0
    for sub in iter_graphs(graph):  # bodies read outer initializers by name too
        for node in sub.node:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
    kept = [t for t in graph.initializer if t.name not in alias]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_info = [v for v in graph.value_info if v.name not in alias]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return len(alias)


def subgraph_weight_count(model: onnx.ModelProto) -> int:
    """Weight elements that live inside If/Loop/Scan bodies (steps report, not touch, them)."""
    total = 0
    for graph in iter_graphs(model.graph):
        if graph is model.graph:
            continue
        total += sum(int(np.prod(t.dims)) for t in graph.initializer)
    return total


def weight_stats(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, zeros) over all initializers of float or integer type, subgraphs included.

    Small integer initializers (shapes, axes) are not weights: only tensors with
    at least 16 elements count.
    """
    params = zeros = 0
    for graph in iter_graphs(model.graph):
        # Per-channel scales and zero points of quantized weights are bookkeeping too.
        qparams = {
            name
            for node in graph.node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear")
            for name in node.input[1:]
        }
        for init in graph.initializer:
            n = int(np.prod(init.dims)) if init.dims else 1
            if (
                n < 16
                or init.name in qparams
                or init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.STRING)
            ):
                continue
            arr = numpy_helper.to_array(init)
            params += n
            zeros += int(n - np.count_nonzero(arr))
    return params, zeros


def figures(
    model_bytes: bytes, model: onnx.ModelProto | None = None, uri: str = ""
) -> ModelFigures:
    """Size, gzip size, sha256, parameters and sparsity of a serialized model."""
    model = model if model is not None else onnx.load_from_string(model_bytes)
    params, zeros = weight_stats(model)
    return ModelFigures(
        uri=uri,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        size_bytes=len(model_bytes),
        # mtime=0 keeps the gzip size reproducible; level 9 is what artifact stores use.
        gzip_size_bytes=len(gzip.compress(model_bytes, compresslevel=9, mtime=0)),
        parameters=params,
        sparsity=round(zeros / params, 6) if params else 0.0,
    )


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> node that writes it."""
    return {name: node for node in graph.node for name in node.output if name}


def replace_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    """Swap an initializer's value (and shape) in place, keeping its name and position."""
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def strip_value_info(model: onnx.ModelProto) -> None:
    """Forget inferred intermediate shapes (they go stale when a step changes shapes)."""
    del model.graph.value_info[:]
