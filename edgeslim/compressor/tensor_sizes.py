"""Sizes an ONNX model declares, checked before onnxruntime allocates them.

A model file is a few bytes of protobuf that can declare tensors of any size:
an initializer or Constant node claiming dims [2^20, 2^20] with no data, or a
ConstantOfShape whose constant shape input asks for terabytes. onnxruntime
allocates these while it builds a session (constant folding) or on the first
run, where a refusal is an unhelpful crash and an overcommitted success takes
the machine's memory. Here every tensor stored in the model must hold exactly
the bytes its dims declare, and every tensor whose shape is known statically
must fit :func:`edgeslim.storage.limits.max_tensor_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import TensorProto, helper

from edgeslim.compressor.graph import iter_graphs
from edgeslim.errors import BadInput
from edgeslim.storage import limits

# Sub-byte types are packed; getattr because older onnx releases lack some of them.
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, name)
}


def element_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type; None for strings and unknown types."""
    if data_type in _PACKED_BITS:
        return _PACKED_BITS[data_type]
    if data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    try:
        return helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8
    except (KeyError, ValueError, TypeError):
        return None  # unknown type: the checker names it


def declared_bytes(dims: list[int], data_type: int) -> int | None:
    """Bytes a tensor of `dims` takes, in Python ints (a lying header cannot overflow)."""
    bits = element_bits(data_type)
    if bits is None:
        return None
    count = 1
    for d in dims:
        count *= d
    return (count * bits + 7) // 8


def _stored_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """(description, tensor) for every tensor the file itself holds, subgraphs included.

    A sparse tensor comes as its values and indices, and as a data-less tensor
    with its dense dims: onnxruntime densifies sparse initializers when it loads them.
    """
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            yield f"initializer {t.name!r}", t
        for sparse in graph.sparse_initializer:
            yield from _sparse(f"sparse initializer {sparse.values.name!r}", sparse)
        for node in graph.node:
            label = f"{node.op_type} node {node.name or (node.output[0] if node.output else '?')!r}"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR or attr.HasField("t"):
                    yield f"attribute {attr.name!r} of {label}", attr.t
                for t in attr.tensors:
                    yield f"attribute {attr.name!r} of {label}", t
                if attr.HasField("sparse_tensor"):
                    yield from _sparse(f"attribute {attr.name!r} of {label}", attr.sparse_tensor)


def _sparse(what: str, sparse: onnx.SparseTensorProto) -> Iterator[tuple[str, TensorProto]]:
    yield f"{what} values", sparse.values
    yield f"{what} indices", sparse.indices
    yield f"{what} (dense)", TensorProto(dims=sparse.dims, data_type=sparse.values.data_type)


def check_stored(model: onnx.ModelProto, where: str) -> None:
    """Every stored tensor: dims non-negative, size within the limit, raw bytes as declared.

    Run before external data is loaded (dims and limits: nothing is read for a
    tensor that is too big) and again after (it then sits in raw_data), and
    before the checker and onnxruntime, which would otherwise allocate what is declared.
    """
    limit = limits.max_tensor_bytes()
    for what, t in _stored_tensors(model):
        dims = list(t.dims)
        if any(d < 0 for d in dims):
            raise BadInput(f"{where}: {what} declares a negative dimension {dims}")
        size = declared_bytes(dims, t.data_type)
        if size is None:
            continue
        if size > limit:
            raise BadInput(
                f"{where}: {what} declares dims {dims} ({limits.human_bytes(size)}), over the "
                f"{limits.human_bytes(limit)} per-tensor limit; set "
                f"{limits.MAX_TENSOR_BYTES_ENV} to raise it"
            )
        bits = element_bits(t.data_type)
        if t.HasField("raw_data") and bits in (4, 8, 16, 32, 64, 128) and len(t.raw_data) != size:
            raise BadInput(
                f"{where}: {what} declares dims {dims} ({size} bytes) "
                f"but holds {len(t.raw_data)} bytes"
            )


def check_inferred(inferred: onnx.ModelProto, where: str) -> None:
    """Every tensor whose shape inference found all dims: within the per-tensor limit.

    `inferred` is the model after `onnx.shape_inference.infer_shapes`; this
    catches what is computed rather than stored, such as a ConstantOfShape,
    Expand or Tile of a constant shape.
    """
    limit = limits.max_tensor_bytes()
    for graph in iter_graphs(inferred.graph):
        for info in (*graph.value_info, *graph.output):
            if not info.type.HasField("tensor_type"):
                continue
            tensor = info.type.tensor_type
            if not tensor.HasField("shape"):
                continue
            if not all(d.HasField("dim_value") for d in tensor.shape.dim):
                continue  # a symbolic dim (the batch): only known at run time
            dims = [d.dim_value for d in tensor.shape.dim]
            size = declared_bytes(dims, tensor.elem_type)
            if size is not None and size > limit:
                raise BadInput(
                    f"{where}: tensor {info.name!r} would be {dims} "
                    f"({limits.human_bytes(size)}), over the {limits.human_bytes(limit)} "
                    f"per-tensor limit; set {limits.MAX_TENSOR_BYTES_ENV} to raise it"
                )
