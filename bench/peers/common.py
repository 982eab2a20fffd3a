"""What every peer runner shares; runs inside a peer's own venv (numpy, onnx and
onnxruntime only, nothing from edgeslim), so each peer tunes with its own loop.

The peer's accuracy during its search is measured here the same way edgeslim
measures it (argmax accuracy on the validation .npz, one CPU thread); the bench
then re-measures every output with edgeslim's own code for the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True, help=".npz named as the model inputs")
    p.add_argument("--val", type=Path, required=True, help=".npz named as the inputs, plus y")
    p.add_argument("--max-drop", type=float, required=True, help="absolute accuracy drop")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--transformer", action="store_true")
    return p.parse_args()


def arrays(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    return {k: v for k, v in data.items() if k != "y"}, data.get("y")


def samples(feeds: dict[str, np.ndarray], n: int | None = None) -> list[dict[str, np.ndarray]]:
    """One batch-1 feed per row."""
    rows = len(next(iter(feeds.values())))
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(min(rows, n or rows))]


def session(model: onnx.ModelProto | bytes | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    blob = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def accuracy(model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray], y) -> float:
    sess = session(model)
    names = {i.name for i in sess.get_inputs()}
    out = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    return float((out.reshape(len(out), -1).argmax(1) == y).mean())


def report(started: float, **extra: object) -> None:
    """The one JSON line the bench reads back."""
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2), **extra}))
    sys.stdout.flush()
