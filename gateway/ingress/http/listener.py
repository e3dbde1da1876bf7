"""The aiohttp server of the HTTP ingress, with a cap on open connections.

aiohttp has no limit on connections; each one holds a socket and a handler task, so a client
opening thousands (or trickling bytes on each: slowloris) could exhaust the process. Past
`http.max_connections` a new connection is answered 503 at once and closed. Connections that
never finish their headers are closed by aiohttp's keep-alive timer (set to
`http.body_timeout_s`, which also bounds the body read: gateway/ingress/http/body.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.ingress.http.errors import error_body

log = logging.getLogger("gateway.http")

_WARN_EVERY_S = 10.0


def _refusal(limit: int) -> bytes:
    body = error_body(f"too many open HTTP connections ({limit}, http.max_connections): "
                      "retry later")
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


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
