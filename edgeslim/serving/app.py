"""The ASGI app: Open Inference Protocol v2 routes, health, metrics.

Written against raw ASGI rather than starlette: the server is a handful of
fixed routes and one JSON body, which fits in this module, and starlette's
router and Request/Response objects add 5-10 us to every request (measured
in-process on the digits model; ``bench/serving.py`` has a row with this
module's handler behind starlette). Any ASGI server runs it; we use uvicorn.

Loading happens in a background thread started at lifespan startup, so the
HTTP server is up at once: liveness answers 200 from the first second and
readiness 503 until the model is loaded. A model that cannot load (wrong
sha256, corrupt or missing file) leaves the server up and unready with the
reason in the log, in ``/v2/health/ready`` and in metrics, rather than exiting:
a restart would fail the same way, and a pod that stays unready keeps the old
ReplicaSet serving during a rollout. Storage outages are retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgeslim import __version__
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.serving import protocol
from edgeslim.serving.chain import NextPart
from edgeslim.serving.connections import BODY_TIMED_OUT
from edgeslim.serving.limits import ServingLimits
from edgeslim.serving.metrics import ServingMetrics
from edgeslim.serving.model import LoadedModel
from edgeslim.serving.protocol import RequestError
from edgeslim.serving.shadow import Shadow, parse_urls

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Loader = Callable[[], LoadedModel]

DEFAULT_MAX_BODY_BYTES = ServingLimits.max_body_bytes

#: What the probe listener answers; everything else there is 404.
HEALTH_ROUTES = frozenset({"server_live", "server_ready"})

# Where a request runs. Alone, small and on a fast model, it runs on the event
# loop itself: handing it to a thread costs more than the work (~100 us of
# wake-ups against a ~50 us inference; bench/serving.py, c=1). With company, it
# goes to a worker thread, so onnxruntime (which releases the GIL) computes
# while the loop parses the next request: ~1.5x the requests/s at c=8-32 on
# two cores. Big bodies and slow models always go to a thread, so probes and
# /metrics stay answered while they compute.
INLINE_MAX_BODY_BYTES = 64 * 1024
INLINE_MAX_RUN_SECONDS = 0.002

_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 60.0

_JSON = [(b"content-type", b"application/json")]
_CLOSE = (b"connection", b"close")


class ModelState:
    """Holds the model once loaded; loads it in a background thread."""

    def __init__(self, name: str, metrics: ServingMetrics) -> None:
        self.name = name
        self.model: LoadedModel | None = None  # set once, only when fully loaded
        self.state = "loading"  # loading | ready | failed
        self.reason = ""
        self._metrics = metrics

    def start(self, loader: Loader) -> threading.Thread:
        # Daemon: a SIGTERM during a long download must not wait for it.
        thread = threading.Thread(
            target=self._load, args=(loader,), name="model-loader", daemon=True
        )
        thread.start()
        return thread

    def _load(self, loader: Loader) -> None:
        delay = _RETRY_FIRST_S
        while True:
            start = time.perf_counter()
            try:
                model = loader()
            except StorageUnavailable as exc:
                self._metrics.model_load_failures.inc()
                self.reason = f"storage unavailable: {exc}"
                log.warning("model %s: %s; retrying in %.0f s", self.name, self.reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except BadInput as exc:
                self._fail(str(exc))
                return
            except Exception as exc:  # a bug or an environment problem: same outcome, with trace
                log.exception("model %s: loading failed", self.name)
                self._fail(f"{type(exc).__name__}: {exc}")
                return
            seconds = time.perf_counter() - start
            self._metrics.model_info.info({"name": self.name, "sha256": model.sha256})
            self._metrics.model_load_seconds.set(seconds)
            self.model = model
            self.state, self.reason = "ready", ""
            self._metrics.model_ready.set(1)
            log.info(
                "model %s ready: %s sha256 %s, loaded in %.2f s, one sample runs in %.2f ms",
                self.name,
                model.path,
                model.sha256,
                seconds,
                model.warmup_seconds * 1e3,
            )
            return

    def _fail(self, reason: str) -> None:
        self._metrics.model_load_failures.inc()
        self.state, self.reason = "failed", reason
        log.error("model %s failed to load, staying unready: %s", self.name, reason)


class ServingApp:
    """The ASGI callable. ``loader`` builds the model; it is started at lifespan startup."""

    def __init__(
        self,
        name: str,
        loader: Loader,
        *,
        limits: ServingLimits | None = None,
        workers: int = 2,
        next_part: NextPart | None = None,
    ) -> None:
        self.name = name
        #: A split model's next part: this part's outputs go there (serving/chain.py).
        self.next_part = next_part
        self.metrics = ServingMetrics()
        #: A canary's comparison with the stable artifact (serving/shadow.py), set by create_app.
        self.shadow: Shadow | None = None
        self.state = ModelState(name, self.metrics)
        self.limits = limits or ServingLimits()
        self.max_body_bytes = self.limits.max_body_bytes
        # Body bytes promised to requests in progress; only the event loop touches it.
        self._budget = self.limits.max_inflight_body_bytes
        self._loader = loader
        # Two workers: one computing while another decodes is where the gain is;
        # more only contend for the GIL and the few cores of an edge box.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        self._started = False

    # ---------------------------------------------------------------- ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Requests have drained by now (the server waits for them first).
                self._pool.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        """Starts loading the model; idempotent. Called at lifespan startup."""
        if not self._started:
            self._started = True
            self.state.start(self._loader)

    # ------------------------------------------------------------------ routing

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        route, version = _route(path)
        headers = _JSON
        # A body left unread would be parsed as the next request: close instead.
        close = False
        try:
            if route not in HEALTH_ROUTES and self._on_probe_port(scope):
                raise RequestError(
                    "this is the probe port: it answers /v2/health/live and /v2/health/ready", 404
                )
            if route == "other":
                raise RequestError(f"no route {path}; see /v2 (Open Inference Protocol)", 404)
            if route == "metrics":
                _allow(method, "GET")
                body, content_type = self.metrics.exposition()
                status, headers = 200, [(b"content-type", content_type.encode())]
            else:
                status, body = await self._v2(route, method, path, version, scope, receive)
            close = route != "infer" and _declares_body(scope)
        except RequestError as exc:
            status, body = exc.status, protocol.dumps({"error": str(exc)})
            close = _declares_body(scope) if exc.close is None else exc.close
            if status == 405:
                headers = [*_JSON, (b"allow", exc.allow.encode())]
            elif status == 503 and exc.close:
                headers = [*_JSON, (b"retry-after", b"1")]
        except Exception as exc:
            # Our bug or onnxruntime failing: answer in the protocol's shape, keep the trace.
            log.exception("%s %s failed", method, path)
            status, body = 500, protocol.dumps({"error": f"internal error: {type(exc).__name__}"})
            close = True
        if close:
            headers = [*headers, _CLOSE]
        self.metrics.count(route, status)
        await _respond(send, status, body, headers)

    async def _v2(
        self,
        route: str,
        method: str,
        path: str,
        version: str | None,
        scope: Scope,
        receive: Receive,
    ) -> tuple[int, bytes]:
        if route == "server_live":
            _allow(method, "GET")
            return 200, protocol.dumps({"live": True})
        if route == "server_ready":
            _allow(method, "GET")
            return await self._chain_readiness()
        if route == "server_metadata":
            _allow(method, "GET")
            return 200, protocol.dumps(
                {"name": "edgeslim", "version": __version__, "extensions": []}
            )
        name = path.split("/")[3]
        if name != self.name:
            raise RequestError(f"unknown model {name!r}; this server serves {self.name!r}", 404)
        if version is not None:
            self._check_version(version)
        if route == "infer":
            _allow(method, "POST")
            return await self._infer(scope, receive)
        _allow(method, "GET")
        if route == "model_ready":
            return await self._chain_readiness()
        metadata = self._ready_model().metadata()
        if self.next_part is not None:  # the chain answers with the last part's outputs
            following = await asyncio.to_thread(self.next_part.metadata)
            metadata["outputs"] = following.get("outputs", [])
        return 200, protocol.dumps(metadata)

    def _on_probe_port(self, scope: Scope) -> bool:
        server = scope.get("server")
        return (
            bool(self.limits.health_port)
            and server is not None
            and (server[1] == self.limits.health_port)
        )

    def _readiness(self) -> tuple[int, bytes]:
        st = self.state
        if st.model is not None:
            return 200, protocol.dumps({"ready": True})
        return 503, protocol.dumps({"ready": False, "state": st.state, "reason": st.reason})

    async def _chain_readiness(self) -> tuple[int, bytes]:
        """Ready when this part is and, for a split model, the next part is too."""
        status, body = self._readiness()
        if status != 200 or self.next_part is None:
            return status, body
        # A thread: the next part's answer may take up to its timeout, and probes
        # and requests keep being answered meanwhile.
        ok, reason = await asyncio.to_thread(self.next_part.ready)
        if ok:
            return status, body
        return 503, protocol.dumps({"ready": False, "state": "waiting", "reason": reason})

    def _ready_model(self) -> LoadedModel:
        model = self.state.model
        if model is None:
            detail = f": {self.state.reason}" if self.state.reason else ""
            raise RequestError(
                f"model {self.name!r} is not ready ({self.state.state}{detail})", 503
            )
        return model

    def _check_version(self, version: str) -> None:
        model = self._ready_model()
        if version != model.version:
            raise RequestError(
                f"model {self.name!r} has no version {version!r}; it serves {model.version!r}", 404
            )

    # ---------------------------------------------------------------- inference

    async def _infer(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        start = time.perf_counter()
        self.metrics.in_flight += 1  # only the event loop thread touches it
        reserved = 0
        try:
            model = self._ready_model()
            body, reserved = await self._read_body(scope, receive)
            try:
                return 200, await self._run(model, body)
            except RequestError as exc:
                exc.close = False  # the body was read whole: the connection stays usable
                raise
        finally:
            # Held until the answer is ready, not just until the body is read: the
            # decoded request is several times the body's size while it is handled.
            self._release(reserved)
            self.metrics.in_flight -= 1
            self.metrics.request_duration.observe(time.perf_counter() - start)

    async def _run(self, model: LoadedModel, body: bytes) -> bytes:
        small = (
            len(body) <= INLINE_MAX_BODY_BYTES
            and model.warmup_seconds < INLINE_MAX_RUN_SECONDS
            and self.next_part is None  # a chain waits on the network: never on the loop
        )
        if small:
            # One turn of the loop lets requests that arrived with this one
            # check in, so in_flight tells whether this one is alone.
            await asyncio.sleep(0)
        if small and self.metrics.in_flight == 1:
            return self._handle(model, body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._handle, model, body)

    def _handle(self, model: LoadedModel, body: bytes) -> bytes:
        """Decode, validate, run, encode: everything between the bytes in and out."""
        request = protocol.parse_infer_request(body)
        feed = model.feed(request)
        # A part of a split model computes all its outputs (the next part's inputs);
        # the outputs the client names are the last part's to pick.
        chained = self.next_part is not None
        names = model.output_names(None if chained else request.outputs)
        start = time.perf_counter()
        outputs = model.run(feed, names)
        self.metrics.inference_duration.observe(time.perf_counter() - start)
        if self.next_part is not None:
            return self.next_part.infer(outputs, request.id, request.outputs)
        answer = protocol.encode_infer_response(model.name, model.version, request.id, outputs)
        if self.shadow is not None:  # after the answer exists; never waits, never raises
            self.shadow.offer(body, outputs)
        return answer

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, int]:
        """The request body and the budget bytes reserved for it (the caller releases them).

        Refused before anything is read when the declared Content-Length is over the
        per-request limit (413) or over what is left of the in-flight budget (503);
        chunked bodies, which declare nothing, are counted against both as they arrive.
        A body that stops arriving is ended by the connection guard's --body-timeout.
        """
        limit = self.max_body_bytes
        reserved = 0
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit():
                declared = int(value)
                if declared > limit:
                    raise _too_large(limit)
                if declared > self._budget:
                    raise _busy()
                reserved = self._reserve(declared)
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if scope.get(BODY_TIMED_OUT):
                        raise RequestError(
                            "request body took too long (--body-timeout)", 408, close=True
                        )
                    raise RequestError("client disconnected before sending the whole body", 400)
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > reserved:  # no (or a false) Content-Length: count as we go
                    if size > limit:
                        raise _too_large(limit)
                    if size - reserved > self._budget:
                        raise _busy()
                    reserved += self._reserve(size - reserved)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), reserved
        except BaseException:
            self._release(reserved)
            raise

    def _reserve(self, n: int) -> int:
        self._budget -= n
        self.metrics.body_bytes_reserved += n
        return n

    def _release(self, n: int) -> None:
        self._budget += n
        self.metrics.body_bytes_reserved -= n


# ------------------------------------------------------------------- helpers


def _route(path: str) -> tuple[str, str | None]:
    """``(route, version)`` for a path; route is one of metrics.ROUTES.

    Matched on split segments rather than regexes: the set is small and fixed,
    and this runs on every request.
    """
    if path == "/metrics":
        return "metrics", None
    parts = path.split("/")  # "/v2/models/m/infer" -> ["", "v2", "models", "m", "infer"]
    n = len(parts)
    if n < 2 or parts[0] or parts[1] != "v2":
        return "other", None
    if n == 2 or (n == 3 and not parts[2]):
        return "server_metadata", None
    if n == 4 and parts[2] == "health":
        return {"live": ("server_live", None), "ready": ("server_ready", None)}.get(
            parts[3], ("other", None)
        )
    if parts[2] != "models" or n < 4 or not parts[3]:
        return "other", None
    rest, version = parts[4:], None
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    if not rest:
        return "model_metadata", version
    if len(rest) == 1 and rest[0] in ("ready", "infer"):
        return ("model_ready" if rest[0] == "ready" else "infer"), version
    return "other", None


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise RequestError(f"method {method} not allowed here; use {allowed}", 405, allow=allowed)


def _declares_body(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if (key == b"content-length" and value.strip(b" 0")) or key == b"transfer-encoding":
            return True
    return False


def _too_large(limit: int) -> RequestError:
    return RequestError(
        f"request body exceeds the {limit}-byte limit (--max-body-bytes); send a smaller batch",
        413,
        close=True,
    )


def _busy() -> RequestError:
    return RequestError(
        "the server is receiving as many request bodies as it may hold "
        "(--max-inflight-body-bytes); retry shortly",
        503,
        close=True,
    )


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    model_uri: str,
    name: str,
    *,
    workdir: Path,
    sha256: str | None = None,
    threads: int = 0,
    limits: ServingLimits | None = None,
    next_part_url: str | None = None,
    next_part_timeout: float = 30.0,
    shadow_url: str | None = None,
    shadow_sample_rate: float = 0.1,
) -> ServingApp:
    """The app for one model; it fetches ``model_uri`` into ``workdir`` once started.

    With ``next_part_url`` it serves one part of a split model and hands its
    outputs on to the next part (:mod:`edgeslim.serving.chain`)."""
    from edgeslim.serving.model import load

    def loader() -> LoadedModel:
        return load(model_uri, name, workdir=workdir, sha256=sha256, threads=threads)

    limits = limits or ServingLimits()
    next_part = None
    workers = 2
    if next_part_url:
        next_part = NextPart(
            next_part_url,
            name,
            timeout=next_part_timeout,
            max_response_bytes=limits.max_body_bytes,
        )
        # Workers also wait on the next part: more of them keep this part computing.
        workers = 4
    app = ServingApp(name, loader, limits=limits, workers=workers, next_part=next_part)
    if shadow_url:  # a canary: compare a sample of answers with the stable servers
        app.shadow = Shadow(parse_urls(shadow_url), name, shadow_sample_rate, app.metrics.registry)
    return app
