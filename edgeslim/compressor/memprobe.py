"""Measure a model's peak RSS in a clean process.

    python -m edgeslim.compressor.memprobe MODEL SAMPLE_NPZ


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
    print(json.dumps({"peakRssBytes": peak_rss_bytes()}))


def peak_rss_bytes() -> int:
    """This process's own high-water mark.

    Not getrusage's ru_maxrss: Linux carries that across fork+exec, so a probe
    started by a parent holding torch would report the parent's peak.
    VmHWM belongs to this process's address space alone.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # non-Linux fallback


if __name__ == "__main__":
    main()
