"""Serving one part of a split model: hand this part's outputs to the next part.

``edgeslim split`` cuts a model into parts that run one after another; each
part runs in a server of its own (one per device). A server given the next
part's endpoint (``--next-part-url``, env ``EDGESLIM_NEXT_PART_URL``) runs its
part, sends the outputs to the next part as an Open Inference Protocol v2
request, and answers its client with what comes back, so a client calling
part 0 gets the whole model's outputs. It is ready only while the next part
is, so part 0's readiness is the whole chain's.

Plain ``http.client`` from a worker thread: the request already runs in one
(onnxruntime releases the GIL, the socket wait does too), and the serving
image stays free of an HTTP client library. Every wait on the next part is
bounded by ``timeout``; what comes back is bounded by the server's own
``--max-body-bytes``.
"""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from edgeslim.errors import BadInput
from edgeslim.serving import protocol
from edgeslim.serving.protocol import RequestError

#: Seconds a readiness answer of the next part is reused: the kubelet probes
#: every part every few seconds, and each probe of part i would otherwise
#: walk the rest of the chain.
READY_CACHE_SECONDS = 1.0
#: A readiness probe is answered within the kubelet's timeout (1 s by default).
READY_TIMEOUT_SECONDS = 0.8

_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class NextPart:
    """The next part's model endpoint: ``http://host:port/v2/models/NAME``."""

    def __init__(self, url: str, name: str, *, timeout: float, max_response_bytes: int) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
            raise BadInput(
                f"next part URL {url!r}: expected http://host:port or "
                "http://host:port/v2/models/NAME"
            )
        path = parts.path.rstrip("/") or f"/v2/models/{name}"
        segments = path.split("/")
        if len(segments) != 4 or segments[1:3] != ["v2", "models"] or not segments[3]:
            raise BadInput(f"next part URL {url!r}: the path must be /v2/models/NAME")
        if not timeout > 0:
            raise BadInput(f"--next-part-timeout {timeout}: must be > 0")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = path
        self.url = f"http://{parts.netloc}{path}"
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._local = threading.local()  # one keep-alive connection per worker thread
        self._ready: tuple[float, bool, str] = (0.0, False, "not asked yet")
        self._metadata: dict[str, Any] | None = None

    # -------------------------------------------------------------- transport

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(
        self, method: str, path: str, body: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        """One exchange; a kept-alive connection the next part closed meanwhile is
        retried once on a fresh one (inference has no side effects)."""
        headers = {"content-type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            conn = self._connection(timeout)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read(self.max_response_bytes + 1)
                if len(data) > self.max_response_bytes:
                    self._drop()
                    raise RequestError(
                        f"the next part's answer exceeds {self.max_response_bytes} bytes "
                        "(--max-body-bytes)",
                        502,
                    )
                if resp.will_close:
                    self._drop()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop()
                if attempt:
                    raise
            except BaseException:
                self._drop()
                raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------- protocol

    def ready(self) -> tuple[bool, str]:
        """Whether the next part answers ready (cached for READY_CACHE_SECONDS)."""
        at, ok, reason = self._ready
        now = time.monotonic()
        if now - at < READY_CACHE_SECONDS:
            return ok, reason
        try:
            status, body = self._request(
                "GET", f"{self.path}/ready", None, min(READY_TIMEOUT_SECONDS, self.timeout)
            )
            ok = status == 200
            reason = "" if ok else f"next part {self.url} is not ready ({_detail(body)})"
        except (*_NETWORK_ERRORS, RequestError) as exc:
            ok, reason = False, f"next part {self.url} unreachable: {_why(exc)}"
        self._ready = (time.monotonic(), ok, reason)
        return ok, reason

    def metadata(self) -> dict[str, Any]:
        """The next part's model metadata (its outputs are the chain's), fetched once."""
        if self._metadata is None:
            status, body = self._call("GET", self.path, None)
            if status != 200:
                raise RequestError(f"next part {self.url} metadata: {_detail(body)}", 503)
            self._metadata = protocol.loads(body)
        return self._metadata

    def infer(
        self,
        outputs: list[tuple[str, str, Any]],
        request_id: str | None,
        wanted: list[str] | None,
    ) -> bytes:
        """This part's outputs as the next part's inputs; its answer, as it came.

        The answer is passed on unchanged: parsing and re-encoding the final
        outputs would cost as much as the next part's own encoding.
        """
        doc: dict[str, Any] = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "data": array.ravel() if array.dtype.kind in "biuf" else array.tolist(),
                }
                for name, datatype, array in outputs
            ]
        }
        if request_id is not None:
            doc["id"] = request_id
        if wanted:
            doc["outputs"] = [{"name": n} for n in wanted]
        status, body = self._call("POST", f"{self.path}/infer", protocol.dumps(doc))
        if status == 200:
            return body
        if status == 400 and wanted and b"unknown output" in body:
            raise RequestError(_detail(body), 400)  # the client asked for an output the model lacks
        # The next part refusing this part's own outputs is a mismatch between
        # the parts, not the client's fault; busy or unready passes on as 503.
        code = 503 if status == 503 else 502
        raise RequestError(f"next part {self.url} answered {status}: {_detail(body)}", code)

    def _call(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        try:
            return self._request(method, path, body, self.timeout)
        except TimeoutError as exc:
            raise RequestError(
                f"next part {self.url} did not answer in {self.timeout:g} s", 504
            ) from exc
        except _NETWORK_ERRORS as exc:
            raise RequestError(f"next part {self.url} unreachable: {_why(exc)}", 502) from exc


def _detail(body: bytes) -> str:
    try:
        doc = protocol.loads(body)
    except RequestError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error") or doc.get("reason"), str):
        return str(doc.get("error") or doc.get("reason"))[:500]
    return body[:200].decode("utf-8", "replace")


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
