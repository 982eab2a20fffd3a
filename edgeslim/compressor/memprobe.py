"""Measure a model's peak RSS in a clean process: `python -m edgeslim.compressor.memprobe MODEL SAMPLE`.

Run as a subprocess by evaluate.py; prints {"peakRssBytes": N}. Only the
serving stack (onnxruntime, numpy) is imported, as on an edge device.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, sample = sys.argv[1], sys.argv[2]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    with np.load(sample, allow_pickle=False) as npz:
        feed = {k: npz[k] for k in npz.files}
    for _ in range(3):
        sess.run(None, feed)
    # ru_maxrss is in KiB on Linux.
    print(json.dumps({"peakRssBytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
