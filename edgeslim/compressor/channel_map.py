"""Which of the source's channels a pruned model's Conv outputs still are.

Structured pruning writes it into the model's metadata; distillation reads it
to give each re-inserted BatchNorm the source's statistics of exactly those
channels (`distill_norm`). Pruning twice (the optimize search cuts the last
student again) composes the maps, so they always point into the source.

A Conv that lost input channels is recorded with no channels ("do not
match"): bias compensation already put its mean back, and rescaling what is
left of it to the source's spread amplified it. Measured over 3 seeds (2 for the detector at 0.7)
(distilled IoU / accuracy at sparsity 0.5 / 0.7): the detector 90.9 / 90.3 with
every conv matched against 91.6 / 91.9 matching only those that lost no input;
mobilenet_v3_small, whose depthwise convs lose no input, needs them matched
(94.4 / 78.2 with none, 98.0 / 95.5 as recorded here).

The record is provenance between steps, not part of the artifact: `without`
removes it before a model is measured or written out.
"""

from __future__ import annotations

import json

import numpy as np
import onnx

KEY = "edgeslim.keptChannels"


def read(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Conv output tensor -> the source channel index of each of its channels (empty:
    its channels are not to be matched to the source's)."""
    for prop in model.metadata_props:
        if prop.key == KEY:
            try:
                raw = json.loads(prop.value)
            except ValueError:
                return {}
            if not isinstance(raw, dict):
                return {}
            return {
                str(name): np.asarray(idx, dtype=np.int64)
                for name, idx in raw.items()
                if isinstance(idx, list) and all(isinstance(i, int) for i in idx)
            }
    return {}


def record(model: onnx.ModelProto, kept: dict[str, np.ndarray], unmatched: set[str]) -> None:
    """Add `kept` (tensor -> indices into this model's channels) to what `model`
    already records, composed so that every entry indexes the source's channels;
    the tensors in `unmatched` are recorded as not to be matched from now on."""
    maps = read(model)
    for name, idx in kept.items():
        if name not in maps:
            maps[name] = np.asarray(idx, dtype=np.int64)
        elif len(maps[name]):  # an unmatched conv stays unmatched
            maps[name] = maps[name][idx]
    for name in unmatched:
        maps[name] = np.zeros(0, dtype=np.int64)
    _drop(model)
    value = json.dumps({k: v.tolist() for k, v in maps.items()}, separators=(",", ":"))
    model.metadata_props.add(key=KEY, value=value)


def without(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when it records nothing, else a copy without the record (the
    original keeps it: a cached student is pruned again later)."""
    if not any(p.key == KEY for p in model.metadata_props):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _drop(out)
    return out


def _drop(model: onnx.ModelProto) -> None:
    kept = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
