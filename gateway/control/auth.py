"""Authentication of the replica control channel (`gateway.internal.ReplicaControl`).

A local replica listens on loopback, where any user of the machine can reach it. Its control
service (the mux stream that carries the gateway's calls, `Reconfigure`, `CollectMetrics`) must
only answer the gateway that started it: the controller draws a random secret per replica
process and hands it over as the first line on the replica's stdin (not argv, which `ps` shows
to everyone, nor the environment, which stays readable in /proc/<pid>/environ); the replica
compares what each control call sends in constant time and answers UNAUTHENTICATED
otherwise. The model's own services stay open (they are what the gateway fronts, and what a
benchmark may call directly).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

ENV_CONTROL_SECRET = "GATEWAY_CONTROL_SECRET"
"""Not used to hand the secret over (see `read_secret`); the controller removes a variable of
this name from a replica's environment so none is inherited from the gateway's."""
MAX_SECRET_LINE = 1024
METADATA_KEY = "x-gateway-control"
CONTROL_PREFIX = "/gateway.internal.ReplicaControl/"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def read_secret(fd: int) -> str:
    """The first line on `fd` (the replica's stdin, written by the controller), read byte by
    byte so nothing after it is consumed; "" at EOF."""
    line = b""
    while len(line) < MAX_SECRET_LINE:
        b = os.read(fd, 1)
        if not b or b == b"\n":
            break
        line += b
    return line.decode("ascii", "replace").strip()


def read_line(fd: int) -> str:
    """The next line on `fd`, whole (the controller writes nothing after it but the pipe's
    end); "" at EOF."""
    chunks: list[bytes] = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
        if b.endswith(b"\n"):
            break
    return b"".join(chunks).decode("utf-8", "replace").rstrip("\n")


class ControlAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """In the replica: refuses control calls without the secret; other services pass."""

    def __init__(self, secret: str) -> None:
        self._expected = secret.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if not method.startswith(CONTROL_PREFIX):
            return await continuation(handler_call_details)
        got = b""
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == METADATA_KEY:
                got = value.encode() if isinstance(value, str) else value
        # No secret configured (a runtime started by hand): the control service stays shut.
        if self._expected and hmac.compare_digest(got, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny(handler)


def _deny(handler: Any) -> Any:
    message = "the replica control service only answers the gateway that started it"

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises; this makes it an async generator

    if handler is None or not handler.response_streaming:
        make = (grpc.stream_unary_rpc_method_handler
                if handler is not None and handler.request_streaming
                else grpc.unary_unary_rpc_method_handler)
        return make(deny_unary)
    make_s = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
              else grpc.unary_stream_rpc_method_handler)
    return make_s(deny_stream)


class _Authed:
    """A multi-callable that sends the secret with every call (merged with the caller's)."""

    __slots__ = ("_mc", "_md")

    def __init__(self, mc: Any, md: tuple[tuple[str, str], ...]) -> None:
        self._mc = mc
        self._md = md

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        md = self._md if metadata is None else (*tuple(metadata), *self._md)
        return self._mc(*args, metadata=md, **kwargs)


class ControlChannel(grpc.aio.Channel):
    """A replica's channel that sends the control secret with every call it makes.

    It wraps the replica's one grpc channel (one connection) with no interceptor: the secret
    is a metadata tuple built once; the proxy's data calls use the bare channel.
    """

    def __init__(self, channel: grpc.aio.Channel, secret: str) -> None:
        self.bare = channel
        self._md = ((METADATA_KEY, secret),)

    async def __aenter__(self) -> ControlChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self.bare.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.bare.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.bare.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.bare.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Authed(self.bare.unary_unary(method, *args, **kwargs), self._md)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Authed(self.bare.unary_stream(method, *args, **kwargs), self._md)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Authed(self.bare.stream_unary(method, *args, **kwargs), self._md)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Authed(self.bare.stream_stream(method, *args, **kwargs), self._md)
