"""How many CPUs this process may really use: the default thread count for
onnxruntime (serving, the compressor's teacher runs) and torch (distillation).

onnxruntime's own default is one thread per physical core of the *machine*,
which in a pod limited to 2 CPUs on a 64-core node means 64 threads fighting
over 2 CPUs' worth of quota and being throttled. The container's CPU quota
(cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``) and the affinity mask say
what is actually available; the smaller of the two wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (1.5 for "150000 100000"), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 = none
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process may use: affinity mask, capped by the quota rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def compute_threads() -> int:
    """Threads for a compute-heavy step: ``OMP_NUM_THREADS`` when the caller set it
    (a test, a bench, a user sharing the machine), else :func:`available_cpus`."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return available_cpus()
