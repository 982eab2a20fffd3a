"""Runs the app under uvicorn: `edgeslim serve`.

uvicorn owns the signals: on SIGTERM (what Kubernetes sends) it stops
accepting connections, lets in-flight requests finish for up to
``graceful_timeout`` seconds, then exits. It picks httptools and uvloop when
installed (the serving extra brings both), which roughly halves per-request
overhead against the pure-Python h11 parser and asyncio's default loop.

The listening sockets are bound here rather than by uvicorn: the main port
and, unless ``--health-port 0``, a probe port that answers only the health
routes with its own connection cap, so a flood of clients on the main port
cannot fail the kubelet's probes. Both run in the one uvicorn server, behind
the connection guard (:mod:`edgeslim.serving.connections`), with limits fitted
to the open-file limit (:mod:`edgeslim.serving.limits`).
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from edgeslim import logs
from edgeslim.cpus import available_cpus
from edgeslim.serving.app import create_app
from edgeslim.serving.connections import ConnectionGuard, guarded
from edgeslim.serving.limits import (
    HEALTH_MAX_CONNECTIONS,
    ServingLimits,
    fit_to_open_files,
    open_files,
    raise_open_file_limit,
)

log = logging.getLogger("edgeslim.serving")


@dataclass(frozen=True)
class ServeOptions:
    model: str
    name: str
    host: str = "0.0.0.0"
    port: int = 8080
    sha256: str | None = None
    threads: int = 0
    limits: ServingLimits = field(default_factory=ServingLimits)
    graceful_timeout: float = 30.0
    workdir: Path | None = None
    log_level: str = "info"
    next_part_url: str | None = None
    """A split model's next part (http://host:port/v2/models/NAME): outputs go on there."""
    next_part_timeout: float = 30.0
    shadow_url: str | None = None
    """A canary: stable servers (http://host:port,...) a sample of requests is compared with."""
    shadow_sample_rate: float = 0.1


def _fastest(module: str, fallback: str) -> str:
    return module if importlib.util.find_spec(module) is not None else fallback


def _http_protocol() -> type:
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (uvicorn listens on it, with the configured backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def configure_logging(level: str) -> None:
    # One line per event on stderr, which is what `kubectl logs` shows: text, or
    # JSON with EDGESLIM_LOG_FORMAT=json; credentials masked either way.
    logs.configure(level)


def serve(opts: ServeOptions) -> int:
    """Serves until SIGTERM/SIGINT; returns the process exit code (0 after a clean drain)."""
    configure_logging(opts.log_level)
    opts.limits.check(opts.port)
    limits = fit_to_open_files(opts.limits, raise_open_file_limit(), open_files())
    ports = [(opts.port, "main")] + [(limits.health_port, "probe")] * bool(limits.health_port)
    sockets: list[socket.socket] = []
    for port, what in ports:
        try:
            sockets.append(_listen(opts.host, port))
        except OSError as exc:
            log.error("cannot listen on %s:%d (%s port): %s", opts.host, port, what, exc)
            for sock in sockets:
                sock.close()
            return 1
    with tempfile.TemporaryDirectory(prefix="edgeslim-serve-", dir=opts.workdir) as tmp:
        app = create_app(
            opts.model,
            opts.name,
            workdir=Path(tmp),
            sha256=opts.sha256,
            threads=opts.threads,
            limits=limits,
            next_part_url=opts.next_part_url,
            next_part_timeout=opts.next_part_timeout,
            shadow_url=opts.shadow_url,
            shadow_sample_rate=opts.shadow_sample_rate,
        )
        caps = {opts.port: limits.max_connections}
        if limits.health_port:
            caps[limits.health_port] = HEALTH_MAX_CONNECTIONS
        guard = ConnectionGuard(
            caps,
            header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout,
            max_header_bytes=limits.max_header_bytes,
            metrics=app.metrics,
        )
        config = uvicorn.Config(
            app,
            http=guarded(_http_protocol(), guard),
            loop=_fastest("uvloop", "asyncio"),
            lifespan="on",
            ws="none",  # no WebSocket routes; an upgrade would leave the connection guard
            log_config=None,  # keep the format configured above
            log_level=opts.log_level,
            access_log=False,  # a line per request costs more than the request; metrics count them
            server_header=False,
            timeout_graceful_shutdown=opts.graceful_timeout,
            # The default (75 s) is a bit longer than typical client pools idle, so
            # clients don't race the server closing a connection they are about to reuse.
            timeout_keep_alive=limits.keep_alive_timeout,
            backlog=limits.backlog,
        )
        server = uvicorn.Server(config)
        log.info(
            "serving model %s from %s on %s:%d with %d onnxruntime threads",
            opts.name,
            opts.model,
            opts.host,
            opts.port,
            opts.threads or available_cpus(),
        )
        if app.next_part is not None:
            log.info(
                "part of a split model: outputs go on to %s (timeout %g s)",
                app.next_part.url,
                app.next_part.timeout,
            )
        log.info(
            "limits: %d connections (+%d on probe port %d), backlog %d, bodies %d bytes each "
            "and %d in flight, body %.0f s, headers %.0f s and %d bytes, keep-alive %.0f s",
            limits.max_connections,
            HEALTH_MAX_CONNECTIONS if limits.health_port else 0,
            limits.health_port,
            limits.backlog,
            limits.max_body_bytes,
            limits.max_inflight_body_bytes,
            limits.body_timeout,
            limits.header_timeout,
            limits.max_header_bytes,
            limits.keep_alive_timeout,
        )
        received: list[int] = []
        # uvicorn re-raises the signal it caught once it has drained, so the default
        # handler would kill us with 143 after a perfectly clean shutdown; note the
        # signal instead and return an exit code that says how it went.
        previous = {
            sig: signal.signal(sig, _recorder(received)) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            server.run(sockets=sockets)
        finally:
            guard.stop()
            for sock in sockets:
                sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            return 1  # e.g. the app failed to start; uvicorn logged why
        return 130 if signal.SIGINT in received else 0


def _recorder(received: list[int]) -> Callable[[int, FrameType | None], None]:
    def handler(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    return handler
