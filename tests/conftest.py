"""Shared fixtures: the digits example model (built once, cached between runs),
a real S3 endpoint (tests/fixtures_s3.py) and the Kubernetes control plane
(tests/cluster/fixtures.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

pytest_plugins = ["tests.fixtures_s3", "tests.cluster.fixtures"]

# One compute thread for torch and the compressor's onnxruntime sessions
# (edgeslim.cpus.compute_threads), here and in the CLI subprocesses that inherit
# it, unless the caller chose: the suite shares 2 cores with the control plane,
# its pods and other work, and two spinning OpenMP/onnxruntime threads per
# process then wait on each other. Measured with ~5 runnable processes on the
# 2 cores: test_optimize.py, test_distill.py, the demo and distill steps took
# 467 s with the default (2) and 114 s with 1; on an idle machine the digits
# pruning search takes 12 s with 2 and 13 s with 1. Pods the node agent runs get
# their own environment, so cluster compressors still take the default.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "examples" / "digits" / "build.py"
# Fewer epochs than the demo: the teacher still reaches ~98% and the suite stays quick.
TEST_EPOCHS = 15


@dataclass(frozen=True)
class Digits:
    dir: Path
    model_path: Path
    train: Path
    val: Path

    def model(self) -> onnx.ModelProto:
        return onnx.load(str(self.model_path))


@pytest.fixture(scope="session")
def digits(request: pytest.FixtureRequest) -> Digits:
    """The digits CNN and its train/val splits, rebuilt only when build.py changes."""
    key = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:12]
    out = Path(request.config.cache.mkdir(f"digits-{key}-{TEST_EPOCHS}"))
    if not (out / "val.npz").exists():
        subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), "--out", str(out), "--epochs", str(TEST_EPOCHS)],
            check=True,
            capture_output=True,
        )
    return Digits(out, out / "cnn.onnx", out / "train.npz", out / "val.npz")
