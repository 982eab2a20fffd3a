"""Operator settings, read once from the environment (the Helm chart sets them).

One place for every knob, so the chart's values.yaml, the Deployment's env and
the code cannot disagree on a name.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not an integer") from exc


@dataclass(frozen=True)
class Settings:
    compressor_image: str = "ghcr.io/edgeslim/compressor:0.1.0"
    """Image of compressor Jobs (EDGESLIM_COMPRESSOR_IMAGE)."""
    compressor_command: list[str] = field(default_factory=lambda: ["edgeslim"])
    """Entrypoint of compressor Jobs (EDGESLIM_COMPRESSOR_COMMAND, shell-split)."""
    serving_image: str = "ghcr.io/edgeslim/serving:0.1.0"
    """Image of edge-serving Deployments (EDGESLIM_SERVING_IMAGE)."""
    serving_command: list[str] = field(default_factory=lambda: ["edgeslim"])
    """Entrypoint of edge-serving pods (EDGESLIM_SERVING_COMMAND, shell-split)."""
    max_concurrent_jobs: int = 4
    """Cluster-wide limit of running compressor Jobs; 0 = unlimited
    (EDGESLIM_MAX_CONCURRENT_JOBS)."""
    kueue_queue: str | None = None
    """When set, Jobs carry kueue.x-k8s.io/queue-name and Kueue admits them
    (EDGESLIM_KUEUE_QUEUE)."""
    job_backoff_limit: int = 2
    """Retries of a compressor pod that failed for a reason other than bad input
    (EDGESLIM_JOB_BACKOFF_LIMIT)."""
    job_ttl_seconds: int = 3600
    """Finished Jobs are garbage-collected after this long (EDGESLIM_JOB_TTL_SECONDS)."""
    metrics_port: int = 8080
    """Port of /metrics, /healthz and /readyz (EDGESLIM_METRICS_PORT)."""
    namespace: str | None = None
    """Watch only this namespace; unset = cluster-wide (EDGESLIM_NAMESPACE)."""

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        command = os.environ.get("EDGESLIM_COMPRESSOR_COMMAND")
        serving_command = os.environ.get("EDGESLIM_SERVING_COMMAND")
        return cls(
            compressor_image=os.environ.get("EDGESLIM_COMPRESSOR_IMAGE", d.compressor_image),
            compressor_command=shlex.split(command) if command else d.compressor_command,
            serving_image=os.environ.get("EDGESLIM_SERVING_IMAGE", d.serving_image),
            serving_command=shlex.split(serving_command) if serving_command else d.serving_command,
            max_concurrent_jobs=_int("EDGESLIM_MAX_CONCURRENT_JOBS", d.max_concurrent_jobs),
            kueue_queue=os.environ.get("EDGESLIM_KUEUE_QUEUE") or None,
            job_backoff_limit=_int("EDGESLIM_JOB_BACKOFF_LIMIT", d.job_backoff_limit),
            job_ttl_seconds=_int("EDGESLIM_JOB_TTL_SECONDS", d.job_ttl_seconds),
            metrics_port=_int("EDGESLIM_METRICS_PORT", d.metrics_port),
            namespace=os.environ.get("EDGESLIM_NAMESPACE") or None,
        )
