"""The torch bridge's operator table: one torch function per ONNX operator.

Each function takes the node's inputs (None for an omitted optional input) and
its attributes, plus two keys the bridge adds: `_opset` (the model's default
domain opset, for operators whose meaning changed between opsets, such as
Softmax before and after 13) and `_outputs` (how many outputs the node has,
which an equal Split needs). The semantics follow the ONNX specification as
onnxruntime implements it; tests/test_torchgraph_ops.py compares every entry
with onnxruntime on single-node graphs at several opsets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import Tensor

from edgeslim.errors import BadInput

Attrs = dict[str, Any]
Inputs = list[Tensor | None]
OpFn = Callable[[Inputs, Attrs], Tensor | tuple[Tensor, ...]]


class UnsupportedModel(BadInput):
    """The graph uses something the torch bridge cannot run."""


def _s(value: Any) -> str:
    """String attributes arrive as bytes from onnx.helper."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt(x: Inputs, i: int) -> Tensor | None:
    return x[i] if len(x) > i else None


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        np_type = helper.tensor_dtype_to_np_dtype(onnx_type)
        return torch.from_numpy(np.zeros(0, dtype=np_type)).dtype
    except (KeyError, TypeError) as exc:
        raise UnsupportedModel(f"tensor type {onnx_type} is not supported") from exc


# --- padding helpers -------------------------------------------------------------------------


def _torch_pad_order(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """Per-axis begin/end pads (first axis first) -> F.pad's last-axis-first order."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [int(b), int(e)]
    return out


def _auto_pads(
    a: Attrs, spatial_in: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dil
) -> list[int]:
    """Explicit ONNX pads [b..., e...] for a Conv/pool node, resolving auto_pad SAME_*."""
    mode = _s(a.get("auto_pad", "NOTSET"))
    n = len(kernel)
    if mode in ("NOTSET",):
        return list(a.get("pads", [0] * 2 * n))
    if mode == "VALID":
        return [0] * 2 * n
    begin, end = [], []
    for size, k, s, d in zip(spatial_in, kernel, strides, dil, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _apply_pads(t: Tensor, pads: list[int], value: float) -> tuple[Tensor, list[int]]:
    """Symmetric pads go to the torch op; asymmetric ones are applied here first."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return t, begin
    return F.pad(t, _torch_pad_order(begin, end), value=value), [0] * n


# --- convolution, pooling, linear ----------------------------------------------------------


def _conv(x: Inputs, a: Attrs) -> Tensor:
    inp, w, b = x[0], x[1], _opt(x, 2)
    spatial = w.dim() - 2
    strides = list(a.get("strides", [1] * spatial))
    dil = list(a.get("dilations", [1] * spatial))
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    pads = _auto_pads(a, inp.shape[2:], kernel, strides, dil)
    inp, pads = _apply_pads(inp, pads, 0.0)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(inp, w, b, strides, pads, dil, a.get("group", 1))


def _conv_transpose(x: Inputs, a: Attrs) -> Tensor:
    inp, w, b = x[0], x[1], _opt(x, 2)
    spatial = w.dim() - 2
    strides = list(a.get("strides", [1] * spatial))
    dil = list(a.get("dilations", [1] * spatial))
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    out_pad = list(a.get("output_padding", [0] * spatial))
    full = [
        s * (n - 1) + op + (k - 1) * d + 1
        for n, s, op, k, d in zip(inp.shape[2:], strides, out_pad, kernel, dil, strict=True)
    ]
    mode = _s(a.get("auto_pad", "NOTSET"))
    if "output_shape" in a or mode in ("SAME_UPPER", "SAME_LOWER"):
        target = (
            list(a["output_shape"])[-spatial:]
            if "output_shape" in a
            else [n * s for n, s in zip(inp.shape[2:], strides, strict=True)]
        )
        begin, end = [], []
        for f, t in zip(full, target, strict=True):
            total = f - t
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
    elif mode == "VALID":
        begin, end = [0] * spatial, [0] * spatial
    else:
        pads = list(a.get("pads", [0] * 2 * spatial))
        begin, end = pads[:spatial], pads[spatial:]
    # torch's output_padding must be smaller than stride or dilation: pad the result instead.
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    out = fn(inp, w, None, strides, 0, 0, a.get("group", 1), dil)
    extra = [f - o for f, o in zip(full, out.shape[2:], strict=True)]
    if any(extra):
        out = F.pad(out, _torch_pad_order([0] * spatial, extra))
    index = [slice(None), slice(None)] + [
        slice(bb, out.shape[2 + i] - ee) for i, (bb, ee) in enumerate(zip(begin, end, strict=True))
    ]
    out = out[tuple(index)]
    if b is not None:
        out = out + b.reshape(1, -1, *([1] * spatial))
    return out


def _pool(kind: str) -> OpFn:
    def run(x: Inputs, a: Attrs) -> Tensor:
        inp = x[0]
        kernel = list(a["kernel_shape"])
        spatial = len(kernel)
        strides = list(a.get("strides", [1] * spatial))
        dil = list(a.get("dilations", [1] * spatial))
        pads = _auto_pads(a, inp.shape[2:], kernel, strides, dil)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            inp, pads = _apply_pads(inp, pads, -math.inf)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return fn(inp, kernel, strides, pads, dil, ceil_mode=ceil)
        include = bool(a.get("count_include_pad", 0))
        n = len(pads) // 2
        if pads[:n] != pads[n:] or any(p * 2 > k for p, k in zip(pads[:n], kernel, strict=False)):
            if not include:
                raise UnsupportedModel("AveragePool with asymmetric pads excluded from the count")
            inp, pads = F.pad(inp, _torch_pad_order(pads[:n], pads[n:])), [0] * 2 * n
        pads = pads[:n]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return fn(inp, kernel, strides, pads, ceil_mode=ceil, count_include_pad=include)

    return run


def _gemm(x: Inputs, a: Attrs) -> Tensor:
    m, w = x[0], x[1]
    if a.get("transA", 0):
        m = m.t()
    if a.get("transB", 0):
        w = w.t()
    out = a.get("alpha", 1.0) * (m @ w)
    c = _opt(x, 2)
    if c is not None:
        out = out + a.get("beta", 1.0) * c
    return out


# --- normalisation -------------------------------------------------------------------------


def _batchnorm(x: Inputs, a: Attrs) -> Tensor:
    # Always inference semantics (running statistics), exactly as the ONNX graph computes
    # it at serving time: training with batch statistics would fit a different function.
    inp, scale, bias, mean, var = x[:5]
    return F.batch_norm(inp, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _layernorm(x: Inputs, a: Attrs) -> Tensor:
    inp, scale, bias = x[0], x[1], _opt(x, 2)
    axis = a.get("axis", -1) % inp.dim()
    shape = inp.shape[axis:]
    scale = scale.expand(shape) if scale.shape != shape else scale
    bias = bias.expand(shape) if bias is not None and bias.shape != shape else bias
    return F.layer_norm(inp, shape, scale, bias, eps=a.get("epsilon", 1e-5))


def _instancenorm(x: Inputs, a: Attrs) -> Tensor:
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))


def _groupnorm(x: Inputs, a: Attrs) -> Tensor:
    inp, scale, bias = x[:3]
    groups = int(a["num_groups"])
    channels = inp.shape[1]
    if scale.numel() == groups and groups != channels:  # opset 18-20: one scale per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(inp, groups, scale, bias, eps=a.get("epsilon", 1e-5))


# --- shape and layout ----------------------------------------------------------------------


def _flatten(x: Inputs, a: Attrs) -> Tensor:
    t = x[0]
    axis = a.get("axis", 1)
    axis = axis + t.dim() if axis < 0 else axis
    return t.reshape(int(np.prod(t.shape[:axis])), -1)


def _reshape(x: Inputs, a: Attrs) -> Tensor:
    t, shape = x[0], _ints(x[1]) or []
    if not a.get("allowzero", 0):
        shape = [t.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return t.reshape(shape)


def _axes(x: Inputs, a: Attrs, index: int = 1) -> list[int] | None:
    """Axes from the input (newer opsets) or the attribute (older ones)."""
    given = _opt(x, index)
    if given is not None:
        return _ints(given)
    return list(a["axes"]) if "axes" in a else None


def _unsqueeze(x: Inputs, a: Attrs) -> Tensor:
    t, axes = x[0], _axes(x, a) or []
    rank = t.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        t = t.unsqueeze(axis)
    return t


def _squeeze(x: Inputs, a: Attrs) -> Tensor:
    axes = _axes(x, a)
    if not axes:
        return x[0].squeeze()
    return x[0].squeeze(tuple(ax % x[0].dim() for ax in axes))


def _concat(x: Inputs, a: Attrs) -> Tensor:
    parts = [t for t in x if t is not None]
    dtype = parts[0].dtype
    return torch.cat([p.to(dtype) for p in parts if p.numel() or p.dim() > 1], dim=a["axis"])


def _split(x: Inputs, a: Attrs) -> tuple[Tensor, ...]:
    t = x[0]
    axis = a.get("axis", 0) % t.dim()
    sizes = _ints(_opt(x, 1)) or (list(a["split"]) if "split" in a else None)
    if sizes is None:
        n = int(a.get("num_outputs", a["_outputs"]))
        chunk = -(-t.shape[axis] // n)
        sizes = [min(chunk, t.shape[axis] - i * chunk) for i in range(n)]
    return tuple(torch.split(t, sizes, dim=axis))


def _gather(x: Inputs, a: Attrs) -> Tensor:
    data, idx = x[0], x[1].long()
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _gather_elements(x: Inputs, a: Attrs) -> Tensor:
    data, idx = x[0], x[1].long()
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def _gather_nd(x: Inputs, a: Attrs) -> Tensor:
    if a.get("batch_dims", 0):
        raise UnsupportedModel("GatherND with batch_dims is not supported")
    data, idx = x[0], x[1].long()
    k = idx.shape[-1]
    dims = torch.tensor(data.shape[:k], dtype=torch.long)
    idx = torch.where(idx < 0, idx + dims, idx)
    return data[tuple(idx[..., i] for i in range(k))]


def _slice(x: Inputs, a: Attrs) -> Tensor:
    t = x[0]
    if len(x) > 1:  # opset 10+: inputs
        starts, ends = _ints(x[1]) or [], _ints(x[2]) or []
        axes = _ints(_opt(x, 3))
        steps = _ints(_opt(x, 4))
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = (list(a["axes"]) if "axes" in a else None), None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        ax %= t.dim()
        size = t.shape[ax]
        if st > 0:
            lo = min(max(s + size if s < 0 else s, 0), size)
            hi = min(max(e + size if e < 0 else e, 0), size)
            t = t.narrow(ax, lo, max(hi - lo, 0))[(slice(None),) * ax + (slice(None, None, st),)]
        else:  # negative steps: clamp as the spec says, then walk the flipped axis
            lo = min(max(s + size if s < 0 else s, -1), size - 1)
            hi = min(max(e + size if e < 0 else e, -1), size - 1)
            idx = torch.arange(lo, hi, st, dtype=torch.long, device=t.device)
            t = torch.index_select(t, ax, idx)
    return t


def _pad(x: Inputs, a: Attrs) -> Tensor:
    t = x[0]
    if len(x) > 1 and x[1] is not None:  # opset 11+: pads, constant_value, axes inputs
        pads = _ints(x[1]) or []
        value_t = _opt(x, 2)
        value = 0.0 if value_t is None or value_t.numel() == 0 else value_t.reshape(-1)[0].item()
        axes = _ints(_opt(x, 3))
    else:
        pads, value, axes = list(a["pads"]), a.get("value", 0.0), None
    rank = t.dim()
    axes = [ax % rank for ax in axes] if axes is not None else list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[n + i]
    mode = _s(a.get("mode", "constant"))
    if mode == "constant":
        return F.pad(t, _torch_pad_order(begin, end), value=value)
    for ax in range(rank):  # reflect / edge / wrap: gather the source index of every position
        if not begin[ax] and not end[ax]:
            continue
        size = t.shape[ax]
        pos = torch.arange(-begin[ax], size + end[ax], dtype=torch.long)
        if mode == "edge":
            idx = pos.clamp(0, size - 1)
        elif mode == "wrap":
            idx = pos % size
        elif mode == "reflect":
            period = 2 * (size - 1) if size > 1 else 1
            m = pos.abs() % period
            idx = torch.where(m >= size, period - m, m)
        else:
            raise UnsupportedModel(f"Pad mode {mode!r} is not supported")
        t = torch.index_select(t, ax, idx)
    return t


def _expand(x: Inputs, a: Attrs) -> Tensor:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]) or []))
    return x[0].expand(shape)


def _tile(x: Inputs, a: Attrs) -> Tensor:
    return x[0].repeat(_ints(x[1]) or [])


def _transpose(x: Inputs, a: Attrs) -> Tensor:
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(*perm)


def _depth_to_space(x: Inputs, a: Attrs) -> Tensor:
    t, b = x[0], int(a["blocksize"])
    n, c, h, w = t.shape
    if _s(a.get("mode", "DCR")) == "DCR":
        t = t.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        t = t.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(x: Inputs, a: Attrs) -> Tensor:
    t, b = x[0], int(a["blocksize"])
    n, c, h, w = t.shape
    t = t.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return t.reshape(n, c * b * b, h // b, w // b)


def _constant(x: Inputs, a: Attrs) -> Tensor:
    if "value" in a:
        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(list(a[key]), dtype=dtype)
    raise UnsupportedModel(f"Constant with attribute {sorted(a)} is not supported")


def _constant_of_shape(x: Inputs, a: Attrs) -> Tensor:
    shape = _ints(x[0]) or []
    if "value" in a:
        value = torch.from_numpy(numpy_helper.to_array(a["value"]).copy()).reshape(-1)
        return value.expand(shape).clone() if shape else value.reshape(()).clone()
    return torch.zeros(shape, dtype=torch.float32)


def _range(x: Inputs, a: Attrs) -> Tensor:
    start, limit, delta = (t.reshape(()) for t in x[:3])
    dtype = start.dtype
    n = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return start + torch.arange(n, dtype=dtype) * delta


def _shape(x: Inputs, a: Attrs) -> Tensor:
    dims = list(x[0].shape)
    return torch.tensor(dims[a.get("start", 0) : a.get("end", len(dims))], dtype=torch.int64)


def _cast(x: Inputs, a: Attrs) -> Tensor:
    return x[0].to(torch_dtype(a["to"]))


def _trilu(x: Inputs, a: Attrs) -> Tensor:
    k = int(x[1].item()) if _opt(x, 1) is not None else 0
    return torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)


def _cumsum(x: Inputs, a: Attrs) -> Tensor:
    t, axis = x[0], int(x[1].item())
    if a.get("reverse", 0):
        t = t.flip(axis)
    out = t.cumsum(axis).to(t.dtype)
    if a.get("exclusive", 0):
        out = out - t
    return out.flip(axis) if a.get("reverse", 0) else out


def _topk(x: Inputs, a: Attrs) -> tuple[Tensor, Tensor]:
    k = int(x[1].reshape(-1)[0].item()) if len(x) > 1 else int(a["k"])
    values, idx = torch.topk(x[0], k, dim=a.get("axis", -1), largest=bool(a.get("largest", 1)))
    return values, idx.long()


def _scatter_nd(x: Inputs, a: Attrs) -> Tensor:
    if _s(a.get("reduction", "none")) != "none":
        raise UnsupportedModel("ScatterND with a reduction is not supported")
    out = x[0].clone()
    idx = x[1].long()
    out[tuple(idx[..., i] for i in range(idx.shape[-1]))] = x[2]
    return out


def _nonzero(x: Inputs, a: Attrs) -> Tensor:
    return torch.nonzero(x[0]).t().contiguous()


# --- reductions and softmax ----------------------------------------------------------------


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpFn:
    def run(x: Inputs, a: Attrs) -> Tensor:
        t = x[0]
        axes = _axes(x, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return t
            axes = list(range(t.dim()))
        return fn(t, tuple(ax % t.dim() for ax in axes), keep)

    return run


def _prod(t: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        t = t.prod(dim=d, keepdim=keep)
    return t


def _arg(fn: Callable[..., Tensor]) -> OpFn:
    def run(x: Inputs, a: Attrs) -> Tensor:
        t, axis = x[0], a.get("axis", 0)
        if a.get("select_last_index", 0):
            flipped = fn(t.flip(axis), dim=axis, keepdim=bool(a.get("keepdims", 1)))
            return t.shape[axis] - 1 - flipped
        return fn(t, dim=axis, keepdim=bool(a.get("keepdims", 1)))

    return run


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    def run(x: Inputs, a: Attrs) -> Tensor:
        t = x[0]
        if a["_opset"] >= 13:
            return fn(t, dim=a.get("axis", -1))
        # Before opset 13 the input is seen as 2-D: [prod(dims before axis), prod(the rest)].
        axis = a.get("axis", 1) % max(t.dim(), 1)
        flat = t.reshape(int(np.prod(t.shape[:axis])), -1)
        return fn(flat, dim=1).reshape(t.shape)

    return run


def _hardmax(x: Inputs, a: Attrs) -> Tensor:
    t = x[0]
    if a["_opset"] >= 13:
        axis = a.get("axis", -1)
        return F.one_hot(t.argmax(dim=axis), t.shape[axis]).movedim(-1, axis).to(t.dtype)
    axis = a.get("axis", 1) % t.dim()
    flat = t.reshape(int(np.prod(t.shape[:axis])), -1)
    return F.one_hot(flat.argmax(dim=1), flat.shape[1]).to(t.dtype).reshape(t.shape)


# --- elementwise ---------------------------------------------------------------------------


def _div(x: Inputs, a: Attrs) -> Tensor:
    if x[0].is_floating_point():
        return torch.div(x[0], x[1])
    return torch.div(x[0], x[1], rounding_mode="trunc")  # integer Div truncates, like C


def _mod(x: Inputs, a: Attrs) -> Tensor:
    return torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])


def _pow(x: Inputs, a: Attrs) -> Tensor:
    return torch.pow(x[0], x[1]).to(x[0].dtype)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(x: Inputs, a: Attrs) -> Tensor:
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return out

    return run


def _mean(x: Inputs, a: Attrs) -> Tensor:
    return _variadic(torch.add)(x, a) / len(x)


def _clip(x: Inputs, a: Attrs) -> Tensor:
    if a["_opset"] < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = _opt(x, 1), _opt(x, 2)
    out = x[0]
    if lo is not None:
        out = torch.maximum(out, torch.as_tensor(lo, dtype=out.dtype))
    if hi is not None:
        out = torch.minimum(out, torch.as_tensor(hi, dtype=out.dtype))
    return out


def _prelu(x: Inputs, a: Attrs) -> Tensor:
    t, slope = x[0], x[1]
    return torch.where(t < 0, t * slope, t)


def _dropout(x: Inputs, a: Attrs) -> tuple[Tensor, Tensor]:
    # Inference semantics: the graph is trained as the function it computes when served.
    return x[0], torch.ones_like(x[0], dtype=torch.bool)


def _isinf(x: Inputs, a: Attrs) -> Tensor:
    t = x[0]
    pos = (t > 0) & bool(a.get("detect_positive", 1))
    neg = (t < 0) & bool(a.get("detect_negative", 1))
    return torch.isinf(t) & (pos | neg)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda x, a: fn(x[0], x[1])


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda x, a: fn(x[0])


def _round(t: Tensor) -> Tensor:
    return torch.round(t)  # half to even, as ONNX


def _resize(x: Inputs, a: Attrs) -> Tensor:
    from edgeslim.compressor.torchgraph_resize import resize  # it imports this module

    return resize(x, a)


def _upsample(x: Inputs, a: Attrs) -> Tensor:
    from edgeslim.compressor.torchgraph_resize import upsample

    return upsample(x, a)


OPS: dict[str, OpFn] = {
    # linear algebra
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Einsum": lambda x, a: torch.einsum(_s(a["equation"]).replace(" ", ""), *x),
    # elementwise arithmetic and logic
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Mod": _mod,
    "Pow": _pow,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "Where": lambda x, a: torch.where(x[0].bool(), x[1], x[2]),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _isinf,
    # unary math
    "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(_round),
    "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Tan": _unary(torch.tan),
    "Atan": _unary(torch.atan),
    "Identity": _unary(lambda t: t),
    # activations
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "LeakyRelu": lambda x, a: F.leaky_relu(x[0], a.get("alpha", 0.01)),
    "PRelu": _prelu,
    "Elu": lambda x, a: F.elu(x[0], a.get("alpha", 1.0)),
    "Selu": lambda x, a: (
        a.get("gamma", 1.0507009873554805)
        * torch.where(x[0] > 0, x[0], a.get("alpha", 1.6732632423543772) * (torch.exp(x[0]) - 1))
    ),
    "Celu": lambda x, a: F.celu(x[0], a.get("alpha", 1.0)),
    "ThresholdedRelu": lambda x, a: torch.where(x[0] > a.get("alpha", 1.0), x[0], 0.0),
    "HardSigmoid": lambda x, a: torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(lambda t: t * torch.clamp(t / 6 + 0.5, 0, 1)),
    "Softplus": _unary(lambda t: torch.logaddexp(t, torch.zeros_like(t))),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(lambda t: t * torch.tanh(torch.logaddexp(t, torch.zeros_like(t)))),
    "Gelu": lambda x, a: F.gelu(x[0], approximate=_s(a.get("approximate", "none"))),
    "Clip": _clip,
    "Dropout": _dropout,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Hardmax": _hardmax,
    # pooling and normalisation
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x, a: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda x, a: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "InstanceNormalization": _instancenorm,
    "GroupNormalization": _groupnorm,
    # reductions
    "ReduceMean": _reduce(lambda t, d, k: t.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda t, d, k: t.sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda t, d, k: t.amax(dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda t, d, k: t.amin(dim=d, keepdim=k)),
    "ReduceProd": _reduce(_prod),
    "ReduceL1": _reduce(lambda t, d, k: t.abs().sum(dim=d, keepdim=k)),
    "ReduceL2": _reduce(lambda t, d, k: (t * t).sum(dim=d, keepdim=k).sqrt()),
    "ReduceSumSquare": _reduce(lambda t, d, k: (t * t).sum(dim=d, keepdim=k)),
    "ReduceLogSumExp": _reduce(lambda t, d, k: torch.logsumexp(t, dim=d, keepdim=k)),
    "ReduceLogSum": _reduce(lambda t, d, k: t.sum(dim=d, keepdim=k).log()),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "CumSum": _cumsum,
    "TopK": _topk,
    # shape and layout
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "Slice": _slice,
    "Pad": _pad,
    "Tile": _tile,
    "Expand": _expand,
    "Shape": _shape,
    "Size": lambda x, a: torch.tensor(x[0].numel(), dtype=torch.int64),
    "NonZero": _nonzero,
    "Trilu": _trilu,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "Resize": _resize,
    "Upsample": _upsample,
    # constants and types
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "CastLike": lambda x, a: x[0].to(x[1].dtype),
}

# Operators whose output depends only on input shapes and constants, never on values.
SHAPE_OPS = {"Shape", "Size"}
# Operators whose float inputs at these positions are trainable weights (None: every input).
WEIGHT_POSITIONS: dict[str, tuple[int, ...] | None] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": None,
    "MatMul": None,
    "Einsum": None,
    "Gather": (0,),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
    "Add": None,
    "Mul": None,
}
