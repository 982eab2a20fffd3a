"""Shadow comparison for a canary: a sample of this server's requests is sent a
second time to a server of the stable artifact, and how often the two answers
agree is counted in this server's metrics.

A canary pod (``--shadow-url``) answers its client from its own model as
always. After it has computed the answer, a sampled request is handed to a
small pool of background threads that send the same body to one of the stable
servers and compare the two outputs; the client never waits for that, and a
shadow that fails or is slow changes nothing but the ``error`` count.

Bounded: at most ``max_in_flight`` comparisons are pending (more are dropped
and counted), each waits at most ``timeout`` seconds, and a stable server that
failed is skipped for ``BACKOFF_SECONDS`` (it may have been scaled down).

Agreement of one request: for outputs with a class axis (last dimension > 1)
the share of rows whose top-1 class is the same; otherwise the cosine
similarity of the two outputs. The metrics hold the sum of these and the
number of comparisons, so the operator reads the mean over any window.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from edgeslim.errors import BadInput
from edgeslim.serving import protocol
from edgeslim.serving.protocol import RequestError

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 5.0
MAX_IN_FLIGHT = 4
#: The stable artifact's answer is at most this big (a shadow has no business with more).
MAX_ANSWER_BYTES = 16 * 1024 * 1024

#: Names of the series (the operator's canary analysis reads them).
REQUESTS = "edgeslim_serving_shadow_requests"
AGREEMENT_SUM = "edgeslim_serving_shadow_agreement_sum"


def parse_urls(text: str) -> list[tuple[str, int]]:
    """``http://host:port[,http://host:port...]`` -> [(host, port)]; BadInput otherwise."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = urlsplit(item)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise BadInput(f"shadow URL {item!r}: expected http://host:port")
        out.append((parts.hostname, parts.port or 80))
    if not out:
        raise BadInput("--shadow-url: give at least one http://host:port")
    return out


def agreement(own: np.ndarray, theirs: np.ndarray) -> float:
    """1.0 for identical answers, down to 0.0 (or -1 for opposite cosines)."""
    if own.shape != theirs.shape or own.size == 0:
        return 0.0
    if own.ndim >= 2 and own.shape[-1] > 1:
        a = own.reshape(-1, own.shape[-1]).argmax(axis=1)
        b = theirs.reshape(-1, theirs.shape[-1]).argmax(axis=1)
        return float(np.mean(a == b))
    x, y = own.ravel().astype(np.float64), theirs.ravel().astype(np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norm == 0.0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float(np.dot(x, y) / norm)


class Shadow:
    """Compares a sample of requests with the stable servers at ``urls``."""

    def __init__(
        self,
        urls: Sequence[tuple[str, int]],
        name: str,
        sample_rate: float,
        registry: CollectorRegistry,
        *,
        timeout: float = 2.0,
        max_in_flight: int = MAX_IN_FLIGHT,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise BadInput(f"--shadow-sample-rate {sample_rate}: must be in (0, 1]")
        self.urls = list(urls)
        self.path = f"/v2/models/{name}/infer"
        self.sample_rate = sample_rate
        self.timeout = timeout
        self._rng = rng
        self._turn = itertools.cycle(range(len(self.urls)))
        self._skip_until = [0.0] * len(self.urls)
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="shadow")
        self.requests = Counter(
            REQUESTS,
            "Requests of this (canary) server also sent to a stable server, by result: "
            "compared, error (no usable answer), dropped (too many pending).",
            ["result"],
            registry=registry,
        )
        for result in ("compared", "error", "dropped"):
            self.requests.labels(result)
        self.agreement_sum = Counter(
            AGREEMENT_SUM,
            "Sum over compared requests of the agreement with the stable answer (share of "
            "identical top-1, or cosine for outputs without a class axis); divide by "
            "requests{result=compared} for the mean.",
            registry=registry,
        )

    def offer(self, body: bytes, outputs: list[tuple[str, str, Any]]) -> None:
        """Maybe compare this request; returns at once and never raises."""
        if self._rng() >= self.sample_rate:
            return
        if not self._slots.acquire(blocking=False):
            self.requests.labels("dropped").inc()
            return
        try:
            self._pool.submit(self._compare, body, outputs)
        except RuntimeError:  # shutting down
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compare(self, body: bytes, outputs: list[tuple[str, str, Any]]) -> None:
        try:
            theirs = self._ask(body) or {}
            mine = {name: np.asarray(array) for name, _, array in outputs}
            common = [n for n in mine if n in theirs]
            if not common:
                self.requests.labels("error").inc()
                return
            self.agreement_sum.inc(max(0.0, agreement(mine[common[0]], theirs[common[0]])))
            self.requests.labels("compared").inc()
        except Exception:  # a shadow must never take the server down
            log.exception("shadow comparison failed")
            self.requests.labels("error").inc()
        finally:
            self._slots.release()

    def _ask(self, body: bytes) -> dict[str, np.ndarray] | None:
        """The stable answer's outputs by name, or None (counted as an error)."""
        now = time.monotonic()
        for _ in range(len(self.urls)):
            i = next(self._turn)
            if self._skip_until[i] > now:
                continue
            host, port = self.urls[i]
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            try:
                conn.request("POST", self.path, body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read(MAX_ANSWER_BYTES + 1)
                if resp.status != 200 or len(data) > MAX_ANSWER_BYTES:
                    self._skip_until[i] = now + BACKOFF_SECONDS
                    continue
                doc = protocol.loads(data)
                return {
                    o["name"]: np.asarray(o["data"], dtype=np.float64).reshape(o["shape"])
                    for o in doc.get("outputs") or []
                }
            except (
                OSError,
                http.client.HTTPException,
                RequestError,
                ValueError,
                KeyError,
                TypeError,
            ):
                self._skip_until[i] = now + BACKOFF_SECONDS
            finally:
                conn.close()
        return None
