"""Every Prometheus metric edgeslim exports, defined once.

Names carry the `edgeslim_` prefix and base units; labels are bounded (phase,
result, handler, and namespace/name only for per-model gauges, which are
removed when the object goes). Served by the operator on
`:$EDGESLIM_METRICS_PORT/metrics`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter as _Counts
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

PHASES = ("Pending", "Queued", "Compressing", "Rejected", "Deploying", "Ready", "Failed")
RESULTS = ("passed", "rejected", "failed")
# How a serving rollout of a new artifact ended: every pod ready on it (complete),
# not ready by progressDeadlineSeconds and returned to the last good artifact
# (rolled_back), or not ready with nothing to return to (failed).
ROLLOUT_RESULTS = ("complete", "rolled_back", "failed")
# The handlers that count edgeslim_reconcile_errors_total; created at 0 so a
# dashboard and a rate() see a flat line rather than no data until the first error.
HANDLERS = ("reconcile", "dispatch", "job", "serving", "resync", "cleanup", "source")
# What a check of a source in storage found (operator/source_watch.py): the same bytes,
# replaced (a re-compression starts), a new compressor (recompressOnUpgrade), nothing
# to compare with yet, the check failed, or nothing to check (pinned, off, busy...).
SOURCE_CHECK_RESULTS = ("same", "changed", "upgrade", "unknown", "error", "skipped")

compressions_started = Counter(
    "edgeslim_compressions_started_total",
    "Compressor Jobs the operator created.",
    registry=REGISTRY,
)
compressions_finished = Counter(
    "edgeslim_compressions_finished_total",
    "Compressions that reached a final result.",
    ["result"],
    registry=REGISTRY,
)
compression_duration = Histogram(
    "edgeslim_compression_duration_seconds",
    "Run time of compressor Jobs, from start to completion or failure.",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
    registry=REGISTRY,
)
model_compression_ratio = Gauge(
    "edgeslim_model_compression_ratio",
    "Source size / artifact size of a model's current result.",
    ["namespace", "name"],
    registry=REGISTRY,
)
model_metric_drop = Gauge(
    "edgeslim_model_metric_drop",
    "Evaluation metric drop (baseline - compressed) of a model's current result.",
    ["namespace", "name"],
    registry=REGISTRY,
)
models = Gauge(
    "edgeslim_models",
    "CompressedModel objects by phase.",
    ["phase"],
    registry=REGISTRY,
)
jobs_running = Gauge(
    "edgeslim_jobs_running",
    "Compressor Jobs holding a slot (created and not finished).",
    registry=REGISTRY,
)
jobs_queued = Gauge(
    "edgeslim_jobs_queued",
    "CompressedModels waiting for a compressor slot (phase Queued).",
    registry=REGISTRY,
)
rollouts = Counter(
    "edgeslim_rollouts_total",
    "Serving rollouts of a new artifact that ended, by result (complete, rolled_back, failed).",
    ["result"],
    registry=REGISTRY,
)
source_checks = Counter(
    "edgeslim_source_checks_total",
    "Checks that a source model in storage is the one its artifact was made from, by result.",
    ["result"],
    registry=REGISTRY,
)
reconcile_errors = Counter(
    "edgeslim_reconcile_errors_total",
    "Handler runs that ended in an error (each retry counts).",
    ["handler"],
    registry=REGISTRY,
)

for _result in RESULTS:
    compressions_finished.labels(result=_result)
for _handler in HANDLERS:
    reconcile_errors.labels(handler=_handler)
for _result in ROLLOUT_RESULTS:
    rollouts.labels(result=_result)
for _result in SOURCE_CHECK_RESULTS:
    source_checks.labels(result=_result)
for _phase in PHASES:
    models.labels(phase=_phase).set(0)


class PhaseTracker:
    """Keeps edgeslim_models{phase} and the per-model gauges in step with the
    objects the operator watches (fed from watch events, so no API calls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase: dict[tuple[str, str], str] = {}
        self._counts: _Counts[str] = _Counts()

    def seen(
        self, namespace: str, name: str, phase: str, ratio: float | None, drop: float | None
    ) -> None:
        key = (namespace, name)
        with self._lock:
            old = self._phase.get(key)
            if old != phase:
                if old is not None:
                    self._counts[old] -= 1
                    models.labels(phase=old).set(self._counts[old])
                self._phase[key] = phase
                self._counts[phase] += 1
                models.labels(phase=phase).set(self._counts[phase])
        _set_or_remove(model_compression_ratio, namespace, name, ratio)
        _set_or_remove(model_metric_drop, namespace, name, drop)

    def gone(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            old = self._phase.pop(key, None)
            if old is not None:
                self._counts[old] -= 1
                models.labels(phase=old).set(self._counts[old])
        _set_or_remove(model_compression_ratio, namespace, name, None)
        _set_or_remove(model_metric_drop, namespace, name, None)


def _set_or_remove(gauge: Gauge, namespace: str, name: str, value: float | None) -> None:
    if value is None:
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    else:
        gauge.labels(namespace=namespace, name=name).set(value)


def watch_queue(running: Callable[[], float], queued: Callable[[], float]) -> None:
    """Reads the Job gauges at scrape time from the operator's live view."""
    jobs_running.set_function(running)
    jobs_queued.set_function(queued)
