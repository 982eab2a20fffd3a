"""Which of the source's channels a pruned model's Conv outputs still are.

Structured pruning writes it into the model's metadata; distillation reads it
to give each re-inserted BatchNorm the source's statistics of exactly those
channels (`distill_norm`). Pruning twice (the optimize search cuts the last
student again) composes the maps, so they always point into the source.

A Conv that lost input channels is recorded with no channels ("do not
match"): bias compensation already put its mean back, and rescaling what is
left of it to the source's spread amplified it -- unless a scale-sensitive
activation reads it (`prune.SCALE_SENSITIVE`: hard-swish, sigmoid, GELU, ...).
ReLU passes any scale through, so a shrunken channel only needs the layers
after it to adapt; hard-swish is near-linear for small inputs and saturates
for large ones, so a channel at the wrong scale computes a different function
until training moves it back. Measured (distilled IoU / accuracy, 10 epochs):
- matching every conv: the detector 0.5 / 0.7 at 90.9 / 90.3 against 91.6 / 91.9
  (3 seeds, 2 at 0.7), resnet18 0.5 / 0.7 at 98.4 / 98.8 against 99.5 / 99.3 (2 seeds);
- matching only convs that lost no input (mobilenet_v3_small's depthwise
  ones; 94.4 / 78.2 at 0.5 / 0.7 with none matched): mobilenet 0.7 at 95.5
  over seeds 0-2 but 86.5 for seeds 3 and 4, which train slowly from the start;
- adding the 18 of its 40 input-cut convs that feed a hard-swish: mobilenet
  0.7 at 96.9 over 5 seeds (spread 1.7; Torch-Pruning 95.9, spread 2.8).
  ReLU-only networks (resnet18, the detector) have no such conv and keep
  their figures.

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
