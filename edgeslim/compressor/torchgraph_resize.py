"""Resize and Upsample for the torch bridge, axis by axis, exactly as onnxruntime does them.

torch's interpolate covers only some of ONNX's coordinate transforms and
rounding modes, so the source coordinate of every output position is computed
here from the spec (in float32, like onnxruntime, so that ties round the same
way) and the result is gathered (nearest) or blended from neighbours (linear,
cubic) one axis at a time. Gathers and blends are differentiable in the input,
which is all training needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgeslim.compressor.torchgraph_ops import UnsupportedModel as _Unsupported

Attrs = dict[str, Any]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _source_coords(
    mode: str, out_size: int, in_size: int, scale: float, roi: tuple[float, float] | None
) -> np.ndarray:
    x = np.arange(out_size, dtype=np.float32)
    s = np.float32(scale)
    if mode == "half_pixel":
        return (x + np.float32(0.5)) / s - np.float32(0.5)
    if mode == "pytorch_half_pixel":
        if out_size == 1:
            return np.zeros(1, np.float32)
        return (x + np.float32(0.5)) / s - np.float32(0.5)
    if mode == "align_corners":
        if out_size == 1:
            return np.zeros(1, np.float32)
        return x * np.float32(in_size - 1) / np.float32(out_size - 1)
    if mode == "asymmetric":
        return x / s
    if mode == "tf_half_pixel_for_nearest":
        return (x + np.float32(0.5)) / s
    if mode == "half_pixel_symmetric":
        adjustment = np.float32(out_size) / (s * np.float32(in_size))
        center = np.float32(in_size) / np.float32(2)
        offset = center * (np.float32(1) - adjustment)
        return offset + (x + np.float32(0.5)) / s - np.float32(0.5)
    raise _Unsupported(f"Resize coordinate_transformation_mode {mode!r} is not supported")


def _nearest(rounding: str, scale: float) -> Callable[[np.ndarray], np.ndarray]:
    if rounding == "round_prefer_floor":
        return lambda v: np.where(v == np.floor(v) + 0.5, np.floor(v), np.round(v))
    if rounding == "round_prefer_ceil":
        return lambda v: np.where(v == np.floor(v) + 0.5, np.ceil(v), np.round(v))
    if rounding == "floor":
        return np.floor
    if rounding == "ceil":
        return np.ceil
    if rounding == "simple":  # Upsample and Resize-10: onnxruntime's original rule
        return np.ceil if scale < 1 else np.trunc
    raise _Unsupported(f"Resize nearest_mode {rounding!r} is not supported")


def _cubic_weights(frac: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic kernel at distances 1+f, f, 1-f, 2-f, as onnxruntime computes them."""
    t = frac.astype(np.float64)
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    w3 = ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a
    return np.stack([w0, w1, w2, w3], axis=1)


def _resize_axis(t: Tensor, axis: int, out_size: int, scale: float, a: Attrs) -> Tensor:
    in_size = t.shape[axis]
    mode = _s(a.get("mode", "nearest"))
    transform = _s(a.get("coordinate_transformation_mode", "half_pixel"))
    coords = _source_coords(transform, out_size, in_size, scale, None)
    if mode == "nearest":
        idx = _nearest(_s(a.get("nearest_mode", "round_prefer_floor")), scale)(coords)
        idx = np.clip(idx, 0, in_size - 1).astype(np.int64)
        return torch.index_select(t, axis, torch.from_numpy(idx))
    view = [1] * t.dim()
    view[axis] = out_size
    if mode == "linear":
        coords = np.clip(coords, 0, in_size - 1)
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, in_size - 1)
        frac = torch.from_numpy((coords - lo).astype(np.float32)).to(t.dtype).reshape(view)
        a0 = torch.index_select(t, axis, torch.from_numpy(lo))
        a1 = torch.index_select(t, axis, torch.from_numpy(hi))
        return a0 + (a1 - a0) * frac
    if mode == "cubic":
        base = np.floor(coords).astype(np.int64)
        weights = _cubic_weights(coords - base, float(a.get("cubic_coeff_a", -0.75)))
        taps = base[:, None] + np.arange(-1, 3)[None, :]
        if a.get("exclude_outside", 0):
            weights = np.where((taps < 0) | (taps >= in_size), 0.0, weights)
            weights = weights / weights.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, in_size - 1)
        out = 0
        for k in range(4):
            w = torch.from_numpy(weights[:, k].astype(np.float32)).to(t.dtype).reshape(view)
            out = out + torch.index_select(t, axis, torch.from_numpy(taps[:, k])) * w
        return out
    raise _Unsupported(f"Resize mode {mode!r} is not supported")


def _run(t: Tensor, scales: list[float] | None, sizes: list[int] | None, a: Attrs) -> Tensor:
    rank = t.dim()
    axes = list(a.get("axes", range(rank)))
    axes = [ax % rank for ax in axes]
    if a.get("antialias", 0):
        raise _Unsupported("Resize with antialias is not supported")
    if _s(a.get("coordinate_transformation_mode", "")) == "tf_crop_and_resize":
        raise _Unsupported("Resize tf_crop_and_resize is not supported")
    full_scales = [1.0] * rank
    full_sizes = list(t.shape)
    if sizes is not None:
        policy = _s(a.get("keep_aspect_ratio_policy", "stretch"))
        if policy != "stretch":
            ratios = [sizes[i] / t.shape[ax] for i, ax in enumerate(axes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            sizes = [int(np.round(r * t.shape[ax])) for ax in axes]
            for ax in axes:
                full_scales[ax] = r
        else:
            for i, ax in enumerate(axes):
                full_scales[ax] = float(np.float32(sizes[i]) / np.float32(t.shape[ax]))
        for i, ax in enumerate(axes):
            full_sizes[ax] = int(sizes[i])
    else:
        assert scales is not None
        for i, ax in enumerate(axes):
            full_scales[ax] = float(scales[i])
            full_sizes[ax] = int(np.floor(np.float32(t.shape[ax]) * np.float32(scales[i])))
    for ax in range(rank):
        if full_sizes[ax] != t.shape[ax] or full_scales[ax] != 1.0:
            t = _resize_axis(t, ax, full_sizes[ax], full_scales[ax], a)
    return t


def _floats(v: Tensor | None) -> list[float] | None:
    if v is None or v.numel() == 0:
        return None
    return [float(x) for x in v.reshape(-1).tolist()]


def resize(x: list[Tensor | None], a: Attrs) -> Tensor:
    t = x[0]
    if a["_opset"] < 11:  # Resize-10: (X, scales), asymmetric, the original rounding
        a = {**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "simple"}
        return _run(t, _floats(x[1]), None, a)
    scales = _floats(x[2]) if len(x) > 2 else None
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    size_list = None if sizes is None else [int(v) for v in sizes.reshape(-1).tolist()]
    if scales is None and size_list is None:
        raise _Unsupported("Resize needs scales or sizes")
    return _run(t, None if size_list is not None else scales, size_list, a)


def upsample(x: list[Tensor | None], a: Attrs) -> Tensor:
    """Upsample (opset 7-9): asymmetric coordinates, nearest or (bi)linear."""
    scales = _floats(x[1]) if len(x) > 1 else [float(s) for s in a["scales"]]
    a = {**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "simple"}
    return _run(x[0], scales, None, a)
