"""Run an ONNX graph as a trainable torch module, then write the weights back.

Distillation needs gradients, and ONNX has none. Rather than converting the
file to torch code and re-exporting it (onnx2torch + torch.onnx.export: two
lossy translations that rename nodes, change opsets and sometimes fail), we
interpret the graph node by node with torch ops, make its float weight
initializers `nn.Parameter`s, train, and copy the trained values back into
the very same ONNX graph. The architecture never changes in training, so the
file keeps its names, opset and metadata, and only weights move.

A graph that uses an operator outside `OPS` is refused up front with the
operator and node named, before any training time is spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import Tensor, nn

from edgeslim.compressor.graph import WEIGHT_OPS
from edgeslim.errors import BadInput

Attrs = dict[str, Any]
OpFn = Callable[[list[Tensor | None], Attrs], Tensor | tuple[Tensor, ...]]


class UnsupportedModel(BadInput):
    """The graph uses something the torch bridge cannot run."""


def _pads(pads: Sequence[int], spatial: int) -> tuple[list[int], bool]:
    """ONNX [x1_begin, x2_begin, ..., x1_end, x2_end] -> torch symmetric pads, or F.pad order."""
    begin, end = list(pads[:spatial]), list(pads[spatial:])
    if begin == end:
        return begin, True
    torch_order: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_order += [b, e]
    return torch_order, False


def _check_auto_pad(a: Attrs) -> None:
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedModel(f"auto_pad={a['auto_pad']!r} is not supported; use explicit pads")


def _conv(x: list[Tensor | None], a: Attrs) -> Tensor:
    _check_auto_pad(a)
    inp, w, b = x[0], x[1], x[2] if len(x) > 2 else None
    spatial = w.dim() - 2
    pads, symmetric = _pads(a.get("pads", [0] * 2 * spatial), spatial)
    if not symmetric:
        inp, pads = F.pad(inp, pads), [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(
        inp,
        w,
        b,
        stride=a.get("strides", 1),
        padding=pads,
        dilation=a.get("dilations", 1),
        groups=a.get("group", 1),
    )


def _pool(kind: str) -> OpFn:
    def run(x: list[Tensor | None], a: Attrs) -> Tensor:
        _check_auto_pad(a)
        inp = x[0]
        kernel = a["kernel_shape"]
        spatial = len(kernel)
        pads, symmetric = _pads(a.get("pads", [0] * 2 * spatial), spatial)
        if not symmetric:
            inp = F.pad(inp, pads, value=-math.inf if kind == "max" else 0.0)
            pads = [0] * spatial
        strides = a.get("strides", [1] * spatial)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return fn(inp, kernel, strides, pads, a.get("dilations", 1), ceil_mode=ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return fn(
            inp,
            kernel,
            strides,
            pads,
            ceil_mode=ceil,
            count_include_pad=bool(a.get("count_include_pad", 0)),
        )

    return run


def _gemm(x: list[Tensor | None], a: Attrs) -> Tensor:
    m, w = x[0], x[1]
    if a.get("transA", 0):
        m = m.t()
    if a.get("transB", 0):
        w = w.t()
    out = a.get("alpha", 1.0) * (m @ w)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return out


def _flatten(x: list[Tensor | None], a: Attrs) -> Tensor:
    t = x[0]
    axis = a.get("axis", 1) % max(t.dim(), 1)
    return t.reshape(int(np.prod(t.shape[:axis])), -1)


def _reshape(x: list[Tensor | None], a: Attrs) -> Tensor:
    t, shape = x[0], [int(s) for s in x[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [t.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return t.reshape(shape)


def _axes(x: list[Tensor | None], a: Attrs) -> list[int] | None:
    if len(x) > 1 and x[1] is not None:
        return [int(v) for v in x[1].tolist()]
    return a.get("axes")


def _unsqueeze(x: list[Tensor | None], a: Attrs) -> Tensor:
    t = x[0]
    for axis in sorted(ax % (t.dim() + len(_axes(x, a))) for ax in _axes(x, a)):
        t = t.unsqueeze(axis)
    return t


def _squeeze(x: list[Tensor | None], a: Attrs) -> Tensor:
    axes = _axes(x, a)
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(ax % x[0].dim() for ax in axes))


def _reduce(fn: str) -> OpFn:
    def run(x: list[Tensor | None], a: Attrs) -> Tensor:
        axes = _axes(x, a)
        keep = bool(a.get("keepdims", 1))
        t = x[0]
        dims = tuple(range(t.dim())) if not axes else tuple(axes)
        return getattr(t, fn)(dim=dims, keepdim=keep)

    return run


def _batchnorm(x: list[Tensor | None], a: Attrs) -> Tensor:
    inp, scale, bias, mean, var = x[:5]
    return F.batch_norm(inp, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _layernorm(x: list[Tensor | None], a: Attrs) -> Tensor:
    inp, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = a.get("axis", -1) % inp.dim()
    return F.layer_norm(inp, inp.shape[axis:], scale, bias, eps=a.get("epsilon", 1e-5))


def _gather(x: list[Tensor | None], a: Attrs) -> Tensor:
    data, idx = x[0], x[1].long()
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :])


def _slice(x: list[Tensor | None], a: Attrs) -> Tensor:
    t = x[0]
    starts, ends = x[1].tolist(), x[2].tolist()
    axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * t.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        if st < 0:
            raise UnsupportedModel("Slice with negative steps is not supported")
        index[ax] = slice(
            int(max(min(s, 2**62), -(2**62))), int(max(min(e, 2**62), -(2**62))), int(st)
        )
    return t[tuple(index)]


def _clip(x: list[Tensor | None], a: Attrs) -> Tensor:
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return torch.clamp(x[0], min=lo, max=hi)


def _cast(x: list[Tensor | None], a: Attrs) -> Tensor:
    np_type = helper.tensor_dtype_to_np_dtype(a["to"])
    return x[0].to(torch.from_numpy(np.zeros(0, dtype=np_type)).dtype)


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    return lambda x, a: fn(x[0], dim=a.get("axis", -1))


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda x, a: fn(x[0], x[1])


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda x, a: fn(x[0])


OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Max": _binary(torch.maximum),
    "Min": _binary(torch.minimum),
    "Equal": _binary(torch.eq),
    "Where": lambda x, a: torch.where(x[0].bool(), x[1], x[2]),
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Identity": _unary(lambda t: t),
    "Dropout": lambda x, a: x[0],  # inference semantics; distillation keeps them off
    "LeakyRelu": lambda x, a: F.leaky_relu(x[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda x, a: torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish),
    "Gelu": lambda x, a: F.gelu(
        x[0], approximate="tanh" if a.get("approximate") in (b"tanh", "tanh") else "none"
    ),
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x, a: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda x, a: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda x, a: x[0].permute(*(a.get("perm") or reversed(range(x[0].dim())))),
    "Concat": lambda x, a: torch.cat([t for t in x if t is not None], dim=a["axis"]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Gather": _gather,
    "Slice": _slice,
    "Shape": lambda x, a: torch.tensor(
        x[0].shape[a.get("start", 0) : a.get("end")], dtype=torch.int64
    ),
    "Expand": lambda x, a: x[0] * torch.ones([int(s) for s in x[1].tolist()], dtype=x[0].dtype),
    "Cast": _cast,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("amax"),
}


def _is_float(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def check_supported(model: onnx.ModelProto) -> None:
    """Raise UnsupportedModel naming every operator the bridge cannot run."""
    bad = sorted(
        {
            f"{n.op_type} (node {n.name or n.output[0]!r})"
            for n in model.graph.node
            if n.op_type not in OPS or n.domain not in ("", "ai.onnx")
        }
    )
    if bad:
        raise UnsupportedModel(
            "the torch bridge used for training cannot run operator "
            + ", ".join(bad[:5])
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; supported: "
            + ", ".join(sorted(OPS))
        )


class OnnxModule(nn.Module):
    """An ONNX graph executed with torch ops; float weight initializers are parameters."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        check_supported(model)
        graph = model.graph
        self.nodes = list(graph.node)
        self.attrs = [
            {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes
        ]
        self.input_names = [
            i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}
        ]
        self.output_names = [o.name for o in graph.output]
        weight_inputs = {
            name
            for n in graph.node
            if n.op_type in WEIGHT_OPS | {"BatchNormalization", "LayerNormalization", "Add", "Mul"}
            for name in n.input[1:]
        }
        self.param_names: dict[str, str] = {}  # onnx initializer name -> parameter key
        self.constants: dict[str, Tensor] = {}
        self.params = nn.ParameterDict()
        for init in graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            # Running statistics of BatchNorm are not weights: they stay constants.
            trainable = _is_float(init) and init.name in weight_inputs and value.numel() > 1
            if trainable and not _is_bn_stat(graph, init.name):
                key = f"p{len(self.param_names)}"
                self.param_names[init.name] = key
                self.params[key] = nn.Parameter(value)
            else:
                self.constants[init.name] = value

    def forward(self, *inputs: Tensor) -> list[Tensor]:
        env: dict[str, Tensor] = dict(zip(self.input_names, inputs, strict=True))
        env.update(self.constants)
        env.update({name: self.params[key] for name, key in self.param_names.items()})
        for node, attrs in zip(self.nodes, self.attrs, strict=True):
            args = [env[name] if name else None for name in node.input]
            try:
                out = OPS[node.op_type](args, attrs)
            except UnsupportedModel as exc:
                raise UnsupportedModel(f"node {node.name!r} ({node.op_type}): {exc}") from exc
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(node.output, outs, strict=False):
                env[name] = value
        return [env[name] for name in self.output_names]

    def weights(self) -> dict[str, Tensor]:
        return {name: self.params[key] for name, key in self.param_names.items()}

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with this module's trained weights in its initializers."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        trained = {
            name: self.params[key].detach().cpu().numpy() for name, key in self.param_names.items()
        }
        for init in out.graph.initializer:
            if init.name in trained:
                dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
                init.CopyFrom(numpy_helper.from_array(trained[init.name].astype(dtype), init.name))
        return out


def _is_bn_stat(graph: onnx.GraphProto, name: str) -> bool:
    return any(n.op_type == "BatchNormalization" and name in n.input[3:5] for n in graph.node)
