"""The aiohttp server of the HTTP ingress: a cap on open connections, and its stop.

aiohttp has no limit on connections; each one holds a socket and a handler task, so a client
opening thousands (or trickling bytes on each: slowloris) could exhaust the process. Past
`http.max_connections` a new connection is answered 503 at once and closed. Connections that
never finish their headers are closed by aiohttp's keep-alive timer (set to
`http.body_timeout_s`, which also bounds the body read: gateway/ingress/http/body.py).

At stop (after the drain's grace: Gateway._stop) aiohttp alone would wait a second for each
handler still running, cancel it, wait another second and drop its connection unanswered.
`stop` answers such calls 503 instead, and waits only as long as their answers take.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway.ingress.http import call
from gateway.ingress.http.errors import error_body

log = logging.getLogger("gateway.http")

_WARN_EVERY_S = 10.0
OTHER_ROUTE = "other"
"""The route label of requests that match no route."""
SHUTTING_DOWN = "the gateway is shutting down"
"""The answer of an HTTP call still running when the listener stops."""
ANSWER_S = 1.0
"""At stop, calls whose answer is back from the proxy (being converted or written) get this
long to finish before they are cut."""
CUT_WRITE_S = 0.5
"""...and the calls cut this long to write their 503."""
FRESH_S = 0.05
"""At stop, what a connection accepted just before the listener closed gets for its request."""
SHUTDOWN_S = 0.1
"""What aiohttp's own shutdown then gives each connection (the rest of an unread body being
drained after its answer): everything worth waiting for has been waited for."""


def _refusal(limit: int) -> bytes:
    body = error_body(f"too many open HTTP connections ({limit}, http.max_connections): "
                      "retry later")
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


class ClientFault(logging.Filter):
    """aiohttp logs a malformed request (bad header bytes...) at ERROR with a traceback; it is
    the client's fault and already answered 400, so it is kept as one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc.message}"[:500]
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class CappedServer(web.Server):
    """A low-level aiohttp server that refuses connections past `max_connections`."""

    def __init__(self, handler: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.refused = 0
        """Connections refused for the cap (tests, logs)."""
        self._warned = 0.0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._warned > _WARN_EVERY_S:  # one line per burst, not per connection
                self._warned = now
                log.warning("HTTP connection refused: %d open (http.max_connections); "
                            "%d refused so far", self.max_connections, self.refused)
            transport.write(_refusal(self.max_connections))
            transport.close()


class Req:
    """What one HTTP request was, for its metric row and log lines, and how far it got
    (what a drain and the stop wait for)."""

    __slots__ = ("answered", "app", "ctx", "deployment", "reached", "route", "status")

    def __init__(self) -> None:
        self.reached = False
        """The call went into the proxy (so a failure may be the deployment's)."""
        self.answered = False
        """...and is back with an answer (or the handler returned): being converted or
        written, which the drain waits for within its grace (Running.pending), and the stop
        for ANSWER_S more (Running.stop)."""
        self.ctx: call.HttpCallContext | None = None
        self.status: int | None = None
        """Set when the answer could not be (fully) sent: 499, the client went away."""
        self.route = OTHER_ROUTE
        self.app = ""
        self.deployment = ""


class Running:
    """The handler tasks answering HTTP calls now, so that the stop can answer those still
    running (503) rather than let aiohttp drop their connections."""

    __slots__ = ("_cut", "calls")

    def __init__(self) -> None:
        self.calls: dict[asyncio.Task[Any], Req] = {}
        self._cut: set[asyncio.Task[Any]] = set()

    def pending(self) -> int:
        """HTTP calls a drain waits for within its grace (beside the proxy's): answers being
        converted or written, as a gRPC answer is until grpc has sent it. Not requests still
        sending their body, or refused calls (answered at once)."""
        return sum(1 for c in self.calls.values() if c.answered)

    def enter(self, call: Req) -> None:
        """Count the current task's call until the task ends (its answer written)."""
        task = asyncio.current_task()
        assert task is not None
        self.calls[task] = call
        task.add_done_callback(self.calls.pop)

    def answer_cut(self, request: web.BaseRequest) -> bool:
        """In a handler's CancelledError branch: True when the stop cut it and its client is
        still there; the cancel is then withdrawn, for the handler to answer."""
        task = asyncio.current_task()
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        if request.transport is None or request.transport.is_closing():
            return False  # nobody to answer
        return task.uncancel() == 0  # else cancelled for another reason as well

    async def stop(self, runner: web.BaseRunner, server: web.Server) -> None:
        """Close the listener and every connection, answering the calls still running."""
        for site in list(runner.sites):
            await site.stop()  # no new connections
        if server.connections:
            # One accepted just now may not have sent its request yet: answered (503,
            # Connection: close) rather than closed unread as idle.
            await asyncio.sleep(FRESH_S)
        server.pre_shutdown()  # no new requests; idle keep-alive connections close
        answered = [t for t, c in self.calls.items() if c.answered]
        if answered:
            await asyncio.wait(answered, timeout=ANSWER_S)
        cut = [t for t in self.calls if not t.done()]
        if cut:
            # Past the drain's grace (the proxy records them UNAVAILABLE: cut_at_stop). Those
            # still in the handler answer 503; an answer still being written is dropped.
            log.warning("HTTP: %d call(s) still running at stop are cut (answered 503)",
                        len(cut))
            self._cut.update(cut)
            for task in cut:
                ctx = self.calls[task].ctx if task in self.calls else None
                if ctx is not None:
                    ctx.cut = True  # recorded UNAVAILABLE, not as a client that left
                task.cancel()
            await asyncio.wait(cut, timeout=CUT_WRITE_S)
        self._cut.clear()
        await runner.cleanup()  # with shutdown_timeout=SHUTDOWN_S
