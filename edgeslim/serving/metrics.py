"""Prometheus metrics of the edge server, all named ``edgeslim_serving_*``.

Kept apart from :mod:`edgeslim.metrics` (the operator's) so the serving image
imports nothing of the operator. Each app gets its own registry rather than
prometheus_client's global one, so several apps can live in one process (tests)
and ``/metrics`` shows exactly this server's series.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

#: Routes are a fixed set so the ``route`` label stays bounded whatever paths clients send.
ROUTES = (
    "infer",
    "model_metadata",
    "model_ready",
    "server_ready",
    "server_live",
    "server_metadata",
    "metrics",
    "other",
)

# From half a millisecond (a digit on a fast core) to ten seconds (a big batch on a slow one).
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # RSS, CPU seconds, open fds: what an edge box runs out of
        PlatformCollector(registry=r)
        self.requests = Counter(
            "edgeslim_serving_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "edgeslim_serving_request_duration_seconds",
            "Time from receiving an inference request to sending its response "
            "(reading, decoding, validating, running, encoding).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "edgeslim_serving_inference_duration_seconds",
            "Time onnxruntime spent computing one request; the rest of the request "
            "duration is protocol overhead.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        #: Inference requests being handled now. A plain int the app bumps, read
        #: only at scrape time: two locked gauge updates per request cost more.
        self.in_flight = 0
        Gauge(
            "edgeslim_serving_requests_in_flight",
            "Inference requests being handled now.",
            registry=r,
        ).set_function(lambda: self.in_flight)
        #: Open connections, from the connection guard once the server runs it.
        self.connections_open: Callable[[], float] = lambda: 0
        Gauge(
            "edgeslim_serving_connections",
            "Open client connections (main and probe listeners).",
            registry=r,
        ).set_function(lambda: self.connections_open())
        self.connections_closed = Counter(
            "edgeslim_serving_connections_closed",
            "Connections the server closed to protect itself, by reason: evicted (room made "
            "for a new one at the cap), refused (at the cap, none evictable), header_timeout, "
            "header_too_large, answer_not_read (none of an answer taken for --body-timeout).",
            ["reason"],
            registry=r,
        )
        self.body_bytes_reserved = 0
        Gauge(
            "edgeslim_serving_body_bytes_reserved",
            "Request body bytes reserved by requests in progress (--max-inflight-body-bytes "
            "bounds it).",
            registry=r,
        ).set_function(lambda: self.body_bytes_reserved)
        self.model_ready = Gauge(
            "edgeslim_serving_model_ready",
            "1 once the model is loaded and serving, else 0.",
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "edgeslim_serving_model_load_seconds",
            "Time the last successful load took (fetch, sha256 check, session build, warm-up).",
            registry=r,
        )
        self.model_load_failures = Counter(
            "edgeslim_serving_model_load_failures",
            "Failed attempts to load the model.",
            registry=r,
        )
        self.model_info = Info(
            "edgeslim_serving_model",
            "The model being served; sha256 of the loaded artifact.",
            registry=r,
        )
        # Label children resolved once: .labels() costs a dict lookup under a lock per call.
        self._counters: dict[tuple[str, int], Counter] = {}

    def count(self, route: str, code: int) -> None:
        child = self._counters.get((route, code))
        if child is None:
            child = self._counters[(route, code)] = self.requests.labels(route, str(code))
        child.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
