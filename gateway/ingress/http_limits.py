"""Bounds for an aiohttp listener: how long a client may take over a request, and how many
connections all clients together may hold open.

aiohttp waits as long as a client likes for the rest of a request once it has sent a byte (a
"slowloris" holds a connection with one header line every few seconds), and it accepts any
number of connections. Here:

- a connection must deliver a complete request head within `header_timeout_s` of opening (or of
  its previous response: an idle keep-alive connection is closed after as long);
- once a request has started, it has `request_timeout_s` for its body, the handler and its
  answer;
- past `max_connections` open connections, a new one gets `503` and is closed at once.

Used by the dashboard (gateway/dashboard/server.py); any other aiohttp listener can use it the
same way: `limits.install(runner.server)` after `runner.setup()`, and `limits.middleware` as the
application's first middleware.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

HEADER_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 36\r\nConnection: close\r\n\r\n"
         b"too many connections; try again soon")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConnectionLimits:
    """One per listener. `refused` and `timed_out` count what the limits cut off."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS,
                 header_timeout_s: float = HEADER_TIMEOUT_S,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.request_timeout_s = request_timeout_s
        self.refused = 0
        self.timed_out = 0
        # Open connections (aiohttp's protocol object) -> (transport, its deadline timer).
        self._open: dict[object, tuple[asyncio.Transport, asyncio.TimerHandle | None]] = {}

    @property
    def open(self) -> int:
        return len(self._open)

    def install(self, server: web.Server | None) -> None:
        """Hook the runner's server (`runner.server`, after `setup()`): aiohttp's protocol
        reports every connection opened and lost to it."""
        assert server is not None, "call after runner.setup()"
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._opened(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._closed(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request's head has arrived: it gets `request_timeout_s` for the rest; after its
        answer the connection has `header_timeout_s` for the next request."""
        conn = request.protocol
        self._arm(conn, self.request_timeout_s)
        try:
            return await handler(request)
        finally:
            self._arm(conn, self.header_timeout_s)

    # -- internals ------------------------------------------------------------------------

    def _opened(self, conn: object, transport: asyncio.Transport) -> None:
        if len(self._open) >= self.max_connections:
            self.refused += 1
            try:
                transport.write(_BUSY)
            finally:
                transport.close()
            return
        self._open[conn] = (transport, None)
        self._arm(conn, self.header_timeout_s)

    def _closed(self, conn: object) -> None:
        entry = self._open.pop(conn, None)
        if entry is not None and entry[1] is not None:
            entry[1].cancel()

    def _arm(self, conn: object, delay_s: float) -> None:
        entry = self._open.get(conn)
        if entry is None:
            return
        transport, timer = entry
        if timer is not None:
            timer.cancel()
        timer = asyncio.get_running_loop().call_later(delay_s, self._expire, conn)
        self._open[conn] = (transport, timer)

    def _expire(self, conn: object) -> None:
        entry = self._open.pop(conn, None)
        if entry is None:
            return
        transport = entry[0]
        self.timed_out += 1
        # Nothing left to send: a plain close. An answer stuck on a client that does not
        # read: dropped (close() would wait for it).
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
