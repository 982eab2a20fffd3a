"""Operator settings, read once from the environment (the Helm chart sets them).

One place for every knob, so the chart's values.yaml, the Deployment's env and
the code cannot disagree on a name.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from edgeslim import __version__, logs
from edgeslim.storage.limits import DEFAULT_MAX_BYTES


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not an integer") from exc


def _positive(name: str, default: int) -> int:
    value = _int(name, default)
    if value <= 0:
        raise ValueError(f"{name}={value} must be a positive number of bytes")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = (os.environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={raw!r} is not true or false")


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
    """Cluster-wide limit of running compressor Jobs; 0 = unlimited; not applied
    under Kueue, whose quota takes its place (EDGESLIM_MAX_CONCURRENT_JOBS)."""
    kueue_queue: str | None = None
    """When set, Jobs carry kueue.x-k8s.io/queue-name and Kueue admits them;
    a CompressionPolicy's maxConcurrent still applies (EDGESLIM_KUEUE_QUEUE)."""
    job_backoff_limit: int = 2
    """Retries of a compressor pod that failed for a reason other than bad input
    (EDGESLIM_JOB_BACKOFF_LIMIT)."""
    job_ttl_seconds: int = 3600
    """Finished Jobs are garbage-collected after this long (EDGESLIM_JOB_TTL_SECONDS)."""
    metrics_port: int = 8080
    """Port of /metrics, /healthz and /readyz (EDGESLIM_METRICS_PORT)."""
    namespace: str | None = None
    """Watch only this namespace; unset = cluster-wide (EDGESLIM_NAMESPACE)."""
    inherit_storage_credentials: bool = False
    """Objects without spec.source.credentialsSecret use ambient credentials:
    their pods may reach the node's instance metadata (cloud IAM role) and the
    operator reads manifests and deletes artifacts for them with its own
    (EDGESLIM_INHERIT_STORAGE_CREDENTIALS). Off: such an object gets no
    storage credentials at all, so it can reach only what needs none."""
    max_download_bytes: int = DEFAULT_MAX_BYTES
    """Largest single file compressor and serving pods download; handed to them
    as EDGESLIM_MAX_DOWNLOAD_BYTES and the base of their scratch size limits."""
    compressor_scratch_bytes: int = 0
    """sizeLimit of the compressor's /tmp emptyDir in bytes; 0 = derived per
    spec from max_download_bytes (EDGESLIM_COMPRESSOR_SCRATCH_BYTES)."""
    serving_scratch_bytes: int = 0
    """sizeLimit of the serving pods' /tmp emptyDir in bytes; 0 = derived from
    max_download_bytes (EDGESLIM_SERVING_SCRATCH_BYTES)."""
    log_format: str = "text"
    """Log lines of the operator and of the serving pods it makes: text or json
    (EDGESLIM_LOG_FORMAT; see edgeslim/logs.py)."""
    source_check_seconds: int = 600
    """How often a source is compared with storage when its spec does not say
    (spec.source.checkIntervalSeconds); 0 = never (EDGESLIM_SOURCE_CHECK_SECONDS).
    Unlike the spec field it may be below 60: an operator-wide choice (tests use 2)."""
    source_check_concurrency: int = 8
    """Source checks (one HEAD each) in flight at once (EDGESLIM_SOURCE_CHECK_CONCURRENCY)."""
    compressor_version: str = __version__
    """edgeslim version of the compressor image: an artifact made by another one is
    re-compressed where spec.recompressOnUpgrade asks (EDGESLIM_COMPRESSOR_VERSION;
    default the operator's own, as the chart's images share its appVersion)."""

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
            inherit_storage_credentials=_bool(
                "EDGESLIM_INHERIT_STORAGE_CREDENTIALS", d.inherit_storage_credentials
            ),
            max_download_bytes=_positive("EDGESLIM_MAX_DOWNLOAD_BYTES", d.max_download_bytes),
            compressor_scratch_bytes=_int(
                "EDGESLIM_COMPRESSOR_SCRATCH_BYTES", d.compressor_scratch_bytes
            ),
            serving_scratch_bytes=_int("EDGESLIM_SERVING_SCRATCH_BYTES", d.serving_scratch_bytes),
            log_format=logs.log_format(),
            source_check_seconds=_int("EDGESLIM_SOURCE_CHECK_SECONDS", d.source_check_seconds),
            source_check_concurrency=max(
                1, _int("EDGESLIM_SOURCE_CHECK_CONCURRENCY", d.source_check_concurrency)
            ),
            compressor_version=os.environ.get("EDGESLIM_COMPRESSOR_VERSION")
            or d.compressor_version,
        )
