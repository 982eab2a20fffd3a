"""Shared fixtures: the digits example model (built once, cached between runs),
a real S3 endpoint (tests/fixtures_s3.py) and the Kubernetes control plane
(tests/cluster/fixtures.py)."""

from __future__ import annotations

import fcntl
import functools
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
    # Under pytest-xdist every worker asks at once: one builds, the others wait.
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "val.npz").exists():
            argv = ["--out", str(out), "--epochs", str(TEST_EPOCHS)]
            subprocess.run(
                [sys.executable, str(BUILD_SCRIPT), *argv],
                check=True,
                capture_output=True,
            )
    return Digits(out, out / "cnn.onnx", out / "train.npz", out / "val.npz")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test` runs `pytest -n 2 --dist loadscope`: every file with control-plane
    tests is one unit on one worker, in file order, sharing one control plane and
    node agent (not one per worker, never two cluster tests at once); every other
    file is a unit of its own, so its module fixtures (a trained model, say) are
    built once. While the cluster tests wait on pods and controllers, the other
    worker computes.

    Not xdist_group marks with `--dist loadgroup`: xdist 3.8 writes the group into
    `item._nodeid`, which pytest 9.2 no longer reads, so it schedules test by test."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "cluster" if path in cluster_files() else path

    return ClusterApart(config, log)


@functools.cache
def cluster_files() -> frozenset[str]:
    """Test files (as node ids name them) that mark any test `cluster`."""
    tests = ROOT / "tests"
    return frozenset(
        p.relative_to(ROOT).as_posix()
        for p in tests.rglob("test_*.py")
        if "mark.cluster" in p.read_text()
    )
