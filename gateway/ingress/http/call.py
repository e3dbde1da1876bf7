"""One HTTP request as a call through the gRPC data plane.

The proxy's forwarders take a grpc servicer context; `HttpCallContext` is the few parts of one
they use. So an HTTP call is routed, admitted (max_ongoing_requests, the queue,
RESOURCE_EXHAUSTED), given a request id, counted, logged, drained and recorded by exactly the
code that does it for gRPC calls, with the request transcoded to the method's message first.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc

from gateway.dataplane.proxy import Proxy
from gateway.dataplane.replicas import UNARY_STREAM, UNARY_UNARY


class HttpCallContext:
    """What `Proxy._forward_*` reads from and writes to a grpc.aio servicer context."""

    __slots__ = ("_metadata", "code", "cut", "details", "initial", "trailers")

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)
        self.cut = False
        """Cancelled by the gateway's stop past the drain's grace (else by its client)."""
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.initial: Sequence[tuple[str, Any]] = ()
        self.trailers: Sequence[tuple[str, Any]] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None  # no client deadline over HTTP: proxy.request_timeout_s applies

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.initial = metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailers = metadata

    async def abort(
        self, code: grpc.StatusCode, details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.code, self.details = code, details
        if trailing_metadata:
            self.trailers = trailing_metadata
        raise grpc.aio.AbortError()

    def request_id(self) -> str:
        for key, value in self.trailers:
            if key == "x-request-id" and isinstance(value, str):
                return value
        return ""

    def headers(self) -> dict[str, str]:
        """The replica's metadata as `Grpc-Metadata-*` headers (grpc-gateway's convention)."""
        out = {}
        for key, value in (*self.initial, *self.trailers):
            if isinstance(value, str) and key not in ("x-request-id", "request_id"):
                out[f"Grpc-Metadata-{key}"] = value
        return out


async def unary(proxy: Proxy, path: str, body: bytes, ctx: HttpCallContext) -> bytes | None:
    """The response bytes, or None with `ctx.code`/`ctx.details` set."""
    try:
        return await proxy.forward_unary(path, path, UNARY_UNARY, body, ctx, True)
    except grpc.aio.AbortError:
        return None


async def server_stream(
    proxy: Proxy, path: str, body: bytes, ctx: HttpCallContext
) -> AsyncGenerator[bytes, None]:
    """The response messages; ends early with `ctx.code`/`ctx.details` set on a failure."""
    gen: Any = proxy.forward_stream(path, path, UNARY_STREAM, body, ctx, True)
    try:
        async for msg in gen:
            yield msg
    except grpc.aio.AbortError:
        return
    finally:
        await gen.aclose()
