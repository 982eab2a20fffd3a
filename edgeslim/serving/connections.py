"""Connection-level defences uvicorn does not have: a cap per listener, header limits.

uvicorn's own ``limit_concurrency`` is not used: it counts every connection
and answers 503 to whatever request comes next, probes included, while still
accepting (and holding a descriptor for) every connection; and it arms no
timer on a connection until its first response, so a client that connects and
never sends a byte, or sends headers a byte at a time, holds a descriptor for
ever. Here each HTTP protocol instance (uvicorn's httptools or h11 one, with
:class:`GuardMixin` in front) moves through three phases::

    headers --(headers complete)--> request --(response sent)--> idle --(first byte)--> headers

* ``headers``: the connection is closed unless the request line and headers
  are complete within ``header_timeout`` (408 when some bytes came, silence
  when none did); more than ``max_header_bytes`` gets 431.
* ``request``: the app owns it and checks body size and budget
  (:mod:`edgeslim.serving.app`, 413/503); a body still arriving after
  ``body_timeout`` gets 408 and the connection is closed.

In any phase, a connection whose client has taken none of the answer waiting
for it for ``body_timeout`` is aborted (see :meth:`GuardMixin.answer_not_read`).
* ``idle``: uvicorn's keep-alive timer (``keep_alive_timeout``) closes it.

Each listening port has its own cap. At the cap, a new connection evicts the
longest idle connection, else the oldest that has sent nothing, else the oldest
still sending headers; only when every connection is running a request is the
newcomer itself turned away (503, closed). A flood of idle or slow connections
therefore cannot lock out new clients, and the probe listener, with its own
cap, cannot be crowded by the main port at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from edgeslim.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

HEADERS, REQUEST, IDLE = "headers", "request", "idle"


def _raw(status: str, message: str, *extra: str) -> bytes:
    """A complete close-delimited JSON response, for answers given outside any request cycle."""
    body = b'{"error":"' + message.encode() + b'"}'
    head = [f"HTTP/1.1 {status}", "content-type: application/json", "connection: close", *extra]
    head.append(f"content-length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_408 = _raw("408 Request Timeout", "request headers took too long")
_408_BODY = _raw("408 Request Timeout", "request body took too long (--body-timeout)")
_431 = _raw("431 Request Header Fields Too Large", "request headers are too large")
_503 = _raw("503 Service Unavailable", "too many connections; retry", "retry-after: 1")


class ConnectionGuard:
    """Open connections per listening port, the limits on them, and the sweeper that times them.

    One sweep a second checks every connection's phase against its deadline,
    rather than a timer per request: arming and cancelling a timer costs 4-8 us
    on the loop, a real share of a 200 us request, while a sweep over even a
    thousand connections is a fraction of a millisecond a second.
    """

    SWEEP_SECONDS = 1.0

    def __init__(
        self,
        caps: dict[int, int],
        *,
        header_timeout: float,
        body_timeout: float,
        max_header_bytes: int,
        metrics: ServingMetrics,
    ) -> None:
        self.caps = caps  # local port -> most connections open at once
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes
        self.metrics = metrics
        # Per port, in admission order (dicts keep it): evicting scans from the oldest.
        self.open: dict[int, dict[GuardMixin, None]] = {port: {} for port in caps}
        self._sweeper: asyncio.TimerHandle | None = None
        metrics.connections_open = self.count

    def admit(self, conn: GuardMixin, port: int) -> bool:
        """Registers ``conn``; makes room by evicting if needed; False: turn it away."""
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.SWEEP_SECONDS, self._sweep, conn.loop)
        conns = self.open.setdefault(port, {})
        cap = self.caps.get(port)
        if cap is not None and len(conns) >= cap:
            victim = _evictable(conns)
            if victim is None:
                self.metrics.connections_closed.labels("refused").inc()
                return False
            self.metrics.connections_closed.labels("evicted").inc()
            del conns[victim]  # now: its close completes only on the loop's next turn
            victim.drop(None)
        conns[conn] = None
        return True

    def release(self, conn: GuardMixin, port: int) -> None:
        self.open.get(port, {}).pop(conn, None)

    def count(self) -> int:
        return sum(len(c) for c in self.open.values())

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        headers_due, body_due = now - self.header_timeout, now - self.body_timeout
        for conns in self.open.values():
            for conn in list(conns):
                if conn.answer_not_read(now, self.body_timeout) or conn.transport.is_closing():
                    continue
                if conn.phase == HEADERS and conn.since < headers_due:
                    self.metrics.connections_closed.labels("header_timeout").inc()
                    # A client that never sent a byte gets silence, like any idle close.
                    conn.drop(_408 if conn.header_bytes else None)
                elif conn.phase == REQUEST:
                    conn.check_body(body_due)
        self._sweeper = loop.call_later(self.SWEEP_SECONDS, self._sweep, loop)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def _evictable(conns: dict[GuardMixin, None]) -> GuardMixin | None:
    """The connection that costs the least to lose, None if every one is running a request.

    First the longest idle keep-alive connection, then the oldest that has sent
    nothing since it opened (the cheapest thing a flood makes), then the oldest
    still sending its headers.
    """
    best: GuardMixin | None = None
    best_key = (3, 0.0)
    for conn in conns:
        if conn.phase == REQUEST:
            continue
        rank = 0 if conn.phase == IDLE else 1 if not conn.header_bytes else 2
        key = (rank, conn.since)
        if key < best_key:
            best, best_key = conn, key
    return best


#: Set in a request's scope when its body timed out, so the app, which then
#: sees the client "disconnect", counts a 408 rather than a client error.
BODY_TIMED_OUT = "edgeslim.body_timed_out"


class GuardMixin:
    """Goes in front of uvicorn's HttpToolsProtocol or H11Protocol (see :func:`guarded`).

    Only uvicorn's stable protocol surface is used: ``connection_made``,
    ``data_received``, ``connection_lost``, ``on_response_complete``,
    ``transport``, ``loop`` and ``cycle`` (a new one once a request's headers are
    complete; its ``more_body``, ``response_started``, ``response_complete``, ``scope``).
    """

    guard: ConnectionGuard  # set on the class built by guarded()
    transport: asyncio.Transport
    cycle: Any
    loop: asyncio.AbstractEventLoop

    phase = HEADERS
    since = 0.0
    header_bytes = 0
    writing_since = 0.0  # since when the sweeper has seen the same bytes waiting to be sent
    write_pending = 0
    _port = 0
    _admitted = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        sockname = transport.get_extra_info("sockname")
        self._port = sockname[1] if isinstance(sockname, tuple) else 0
        self._enter(HEADERS)
        if not self.guard.admit(self, self._port):
            self.drop(_503)
            return
        self._admitted = True

    def data_received(self, data: bytes) -> None:
        if self.phase == IDLE:  # the next request on a keep-alive connection begins
            self._enter(HEADERS)
        before = self.cycle
        if self.phase == HEADERS:
            self.header_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self.phase == HEADERS:
            if self.cycle is not before:
                self._enter(REQUEST)  # the headers are complete: the app has the request
            elif self.header_bytes > self.guard.max_header_bytes:
                self.guard.metrics.connections_closed.labels("header_too_large").inc()
                self.drop(_431)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # A pipelined request may already have started in its place.
        self._enter(IDLE if self.cycle is None or self.cycle.response_complete else REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self.guard.release(self, self._port)
        super().connection_lost(exc)  # type: ignore[misc]

    def drop(self, response: bytes | None) -> None:
        """Closes the connection, after ``response`` if one is given.

        Without one, anything still waiting to be sent is discarded: a plain
        close would wait for a client that may never read it.
        """
        if response is not None and not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()
        elif self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def check_body(self, body_due: float) -> None:
        """408 and close if the request's body is still arriving after ``body_timeout``."""
        cycle = self.cycle
        if self.since < body_due and cycle is not None and cycle.more_body:
            if cycle.response_started:  # answered early (413, 503): the app is done with it
                return
            cycle.scope[BODY_TIMED_OUT] = True
            self.drop(_408_BODY)

    def answer_not_read(self, now: float, timeout: float) -> bool:
        """Aborts the connection if its client has taken none of our answer for ``timeout``.

        uvicorn hands a whole answer to the transport at once, and a transport
        closes (for the keep-alive timer, say) only once its buffer is flushed: a
        client that never reads would hold the connection and the answer's bytes
        for ever. Any change in what is buffered counts as progress, so a slow
        but reading client is never cut off.
        """
        pending = self.transport.get_write_buffer_size()
        if not pending:
            self.writing_since = 0.0
            return False
        if pending != self.write_pending or not self.writing_since:
            self.writing_since, self.write_pending = now, pending
            return False
        if now - self.writing_since <= timeout:
            return False
        self.guard.metrics.connections_closed.labels("answer_not_read").inc()
        self.transport.abort()  # close() would wait for the client to read
        return True

    def _enter(self, phase: str) -> None:
        self.phase, self.since, self.header_bytes = phase, time.monotonic(), 0


def guarded(base: type[asyncio.Protocol], guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """``base``, a uvicorn HTTP protocol class, with :class:`GuardMixin` in front."""
    return type(f"Guarded{base.__name__}", (GuardMixin, base), {"guard": guard})
