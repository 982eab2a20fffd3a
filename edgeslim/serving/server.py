"""Runs the app under uvicorn: `edgeslim serve`.

uvicorn owns the signals: on SIGTERM (what Kubernetes sends) it stops
accepting connections, lets in-flight requests finish for up to
``graceful_timeout`` seconds, then exits. It picks httptools and uvloop when
installed (the serving extra brings both), which roughly halves per-request
overhead against the pure-Python h11 parser and asyncio's default loop.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from edgeslim.serving.app import DEFAULT_MAX_BODY_BYTES, create_app
from edgeslim.serving.cpus import available_cpus

log = logging.getLogger("edgeslim.serving")


@dataclass(frozen=True)
class ServeOptions:
    model: str
    name: str
    host: str = "0.0.0.0"
    port: int = 8080
    sha256: str | None = None
    threads: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    graceful_timeout: float = 30.0
    workdir: Path | None = None
    log_level: str = "info"


def _fastest(module: str, fallback: str) -> str:
    return module if importlib.util.find_spec(module) is not None else fallback


def configure_logging(level: str) -> None:
    # One line per event on stderr, which is what `kubectl logs` shows.
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(opts: ServeOptions) -> int:
    """Serves until SIGTERM/SIGINT; returns the process exit code (0 after a clean drain)."""
    configure_logging(opts.log_level)
    with tempfile.TemporaryDirectory(prefix="edgeslim-serve-", dir=opts.workdir) as tmp:
        app = create_app(
            opts.model,
            opts.name,
            workdir=Path(tmp),
            sha256=opts.sha256,
            threads=opts.threads,
            max_body_bytes=opts.max_body_bytes,
        )
        config = uvicorn.Config(
            app,
            host=opts.host,
            port=opts.port,
            http=_fastest("httptools", "h11"),
            loop=_fastest("uvloop", "asyncio"),
            lifespan="on",
            log_config=None,  # keep the format configured above
            log_level=opts.log_level,
            access_log=False,  # a line per request costs more than the request; metrics count them
            server_header=False,
            timeout_graceful_shutdown=opts.graceful_timeout,
            # Keep-alive a bit longer than typical client pools idle, so clients don't
            # race the server closing a connection they are about to reuse.
            timeout_keep_alive=75,
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
        received: list[int] = []
        # uvicorn re-raises the signal it caught once it has drained, so the default
        # handler would kill us with 143 after a perfectly clean shutdown; note the
        # signal instead and return an exit code that says how it went.
        previous = {
            sig: signal.signal(sig, _recorder(received)) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            return 1  # e.g. the port is taken; uvicorn logged why
        return 130 if signal.SIGINT in received else 0


def _recorder(received: list[int]) -> Callable[[int, FrameType | None], None]:
    def handler(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    return handler
