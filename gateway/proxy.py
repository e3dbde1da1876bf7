"""The data plane: a generic gRPC handler that forwards every call to a replica as bytes.

Hot path rules: no protobuf decoding, no blocking I/O, no per-call formatting for disabled
features. Each finished call becomes one `CallRecord` handed to the observers (telemetry,
access log, prediction records), which must be cheap and must not raise.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway import errors
from gateway.errors import GatewayError
from gateway.methods import OTHER, MethodInfo, MethodTable
from gateway.mux import MuxRpcError
from gateway.replicas import (
    STREAM_STREAM,
    STREAM_UNARY,
    UNARY_STREAM,
    UNARY_UNARY,
    Replica,
)
from gateway.router import Router

log = logging.getLogger("gateway.proxy")

OK = grpc.StatusCode.OK
CANCELLED = grpc.StatusCode.CANCELLED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INTERNAL = grpc.StatusCode.INTERNAL

# Headers that describe this hop, not the call: grpc sets its own on the upstream call.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
        "host", ":authority", "user-agent", "content-type", "grpc-timeout", "grpc-encoding",
        "grpc-accept-encoding", "grpc-previous-rpc-attempts",
    }
)
REQUEST_ID_KEYS = ("x-request-id", "request_id")
MAX_REQUEST_ID_LEN = 512


@dataclass(slots=True)
class CallRecord:
    """What one call through the gateway did; handed to every observer once it ends."""

    application: str
    """The routed application, or "" when the call was not routed (unknown or missing)."""
    deployment: str
    replica: str
    method: str
    method_label: str
    code: grpc.StatusCode
    details: str
    latency_s: float
    start_time: float
    request_id: str
    request_bytes: int
    response_bytes: int
    gateway_error: bool
    """True when the gateway made the status (routing, queueing, reachability)."""
    request: bytes | None = None
    """Captured request bytes (unary requests of sampled calls only)."""
    response: bytes | None = None


Observer = Callable[[CallRecord], None]


class _Counted:
    """A client's request stream passed upstream as it is, counting the bytes that went by."""

    __slots__ = ("_it", "size")

    def __init__(self, it: AsyncIterator[bytes]) -> None:
        self._it = it
        self.size = 0

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        message = await self._it.__anext__()
        self.size += len(message)
        return message


class AppRoute:
    """Everything the proxy needs for one application, built when the config is applied."""

    __slots__ = ("capture", "deployment", "name", "router", "stream_capture")

    def __init__(self, name: str, router: Router) -> None:
        self.name = name
        self.deployment = router.deployment
        self.router = router
        self.capture: Callable[[str], bool] | None = None
        """Set by the record pipeline: decides per method whether to keep the payloads."""
        self.stream_capture: Callable[[str], Any] | None = None
        """Set by the record pipeline: for a sampled streaming call, an object that keeps its
        messages (`requests_of`, `response`, `done`; gateway/record_capture.py), else None."""


class Proxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Routes by the `application` metadata key and forwards all four RPC shapes."""

    def __init__(
        self,
        methods: MethodTable,
        retries: int = 2,
        request_timeout_s: float | None = None,
    ) -> None:
        self.methods = methods
        self.retries = retries
        self.request_timeout_s = request_timeout_s
        self.routes: dict[str, AppRoute] = {}
        self.default_route: AppRoute | None = None
        self.observers: list[Observer] = []
        self.ongoing = 0
        self.draining = False
        self.on_unreachable: Callable[[Replica], None] | None = None
        """Called when a replica could not be reached, so the controller re-checks it."""
        self._handlers: dict[str, Any] = {}

    # -- routing table -------------------------------------------------------------------

    def set_routes(self, routes: dict[str, AppRoute]) -> None:
        self.routes = dict(routes)
        self.default_route = next(iter(routes.values())) if len(routes) == 1 else None

    # -- grpc.GenericRpcHandler ----------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        h = self._handlers.get(path)
        if h is not None:
            return h
        info = self.methods.get(path)
        h = self._make_handler(path, info)
        if info is not None:
            # Unknown paths are not cached: clients could otherwise grow this dict forever.
            self._handlers[path] = h
        return h

    def _make_handler(self, path: str, info: MethodInfo | None) -> Any:
        label = path if info is not None else OTHER
        if info is None or (info.client_streaming and info.server_streaming):
            # Unknown shape: a bidi stream carries any of the four shapes on the wire.

            # partial keeps it an async generator function, which is how grpc spots streams.
            ss = functools.partial(self._forward_stream, path, label, STREAM_STREAM)
            return grpc.stream_stream_rpc_method_handler(ss)
        if info.client_streaming:
            su = functools.partial(self._forward_unary, path, label, STREAM_UNARY)
            return grpc.stream_unary_rpc_method_handler(su)
        if info.server_streaming:

            us = functools.partial(self._forward_stream, path, label, UNARY_STREAM)
            return grpc.unary_stream_rpc_method_handler(us)

        # A partial of a coroutine function is still one to grpc: no extra coroutine per call.
        uu = functools.partial(self._forward_unary, path, label, UNARY_UNARY)
        return grpc.unary_unary_rpc_method_handler(uu)

    # -- per call ------------------------------------------------------------------------

    def _prepare(self, ctx: Any) -> tuple[AppRoute, str, list[tuple[str, Any]]]:
        """Route, request id and the metadata to forward."""
        app: str | None = None
        rid: str | None = None
        fwd: list[tuple[str, Any]] = []
        for key, value in ctx.invocation_metadata() or ():
            if key in HOP_BY_HOP:
                continue
            if key == "application":
                app = value
            elif key == "x-request-id" or key == "request_id":
                if rid is None:
                    rid = value
                continue
            fwd.append((key, value))
        if rid is None or not rid:
            rid = str(uuid.uuid4())
        elif len(rid) > MAX_REQUEST_ID_LEN:
            raise errors.bad_metadata("x-request-id", f"longer than {MAX_REQUEST_ID_LEN} chars")
        fwd.append(("x-request-id", rid))
        err: GatewayError | None = None
        if self.draining:
            err = errors.draining()
        elif app is None:
            route = self.default_route
            if route is None:
                err = errors.application_missing(self.routes)
        else:
            route = self.routes.get(app)  # type: ignore[assignment]
            if route is None:
                err = errors.application_unknown(app, self.routes)
        if err is not None:
            err.request_id = rid  # so the refusal is logged and answered with its request id
            raise err
        return route, rid, fwd  # type: ignore[return-value]

    @staticmethod
    def _cancel_code(ctx: Any) -> grpc.StatusCode:
        """grpc cancels the handler both when the client cancels and when its deadline ends."""
        remaining = ctx.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return CANCELLED

    def _timeout(self, ctx: Any) -> float | None:
        remaining: float | None = ctx.time_remaining()
        # grpc reports a huge number when the client set no deadline.
        if remaining is None or remaining > 1e8:
            return self.request_timeout_s
        return max(remaining, 0.0)

    @staticmethod
    def _trailers(trailing: Any, rid: str) -> tuple[tuple[str, Any], ...]:
        out = [(k, v) for k, v in (trailing or ()) if k not in REQUEST_ID_KEYS]
        out.append(("x-request-id", rid))
        out.append(("request_id", rid))
        return tuple(out)

    def _retriable(self, e: grpc.aio.AioRpcError, replica: Replica) -> bool:
        """A connection failure before the replica received anything (not the replica's own
        UNAVAILABLE): no headers came back and the channel is not connected."""
        if e.code() is not UNAVAILABLE:
            return False
        if isinstance(e, MuxRpcError):
            return not e.sent
        if e.initial_metadata():
            return False
        state = replica.channel.get_state(try_to_connect=False)
        return bool(state is not grpc.ChannelConnectivity.READY)

    def _finish(self, rec: CallRecord) -> None:
        for obs in self.observers:
            try:
                obs(rec)
            except Exception:  # an observer must never break the call path
                log.exception("call observer failed")

    async def _forward_unary(
        self, path: str, label: str, shape: int, request: Any, ctx: Any
    ) -> bytes | None:
        """Unary and client-streaming calls: one response (or a status) comes back."""
        t0 = time.perf_counter()
        wall = time.time()
        self.ongoing += 1
        app = dep = rep_id = ""
        rid = ""
        code = OK
        details = ""
        gw_err = False
        response: bytes | None = None
        captured = False
        stream: Any = None
        if shape == UNARY_UNARY:
            req_size = len(request)
        else:
            request = counted = _Counted(request)
            req_size = 0
        try:
            route, rid, md = self._prepare(ctx)
            app, dep = route.name, route.deployment
            captured = route.capture is not None and shape == UNARY_UNARY and route.capture(path)
            if route.stream_capture is not None and shape != UNARY_UNARY:
                stream = route.stream_capture(path)
                request = request if stream is None else stream.requests_of(request)
            timeout = self._timeout(ctx)
            router = route.router
            replica: Replica | None = None
            attempt = 0
            while True:
                # The common case needs no await: a replica with room is there.
                picked = router.take() if replica is None else None
                replica = picked or await router.acquire(timeout, exclude=replica)
                rep_id = replica.replica_id
                call = None
                try:
                    call = replica.callable(path, shape)(request, metadata=md, timeout=timeout)
                    response = await call
                    ctx.set_trailing_metadata(self._trailers(await call.trailing_metadata(), rid))
                    return response
                except grpc.aio.AioRpcError as e:
                    if (
                        shape == UNARY_UNARY
                        and attempt < self.retries
                        and self._retriable(e, replica)
                    ):
                        attempt += 1
                        if self.on_unreachable is not None:
                            self.on_unreachable(replica)
                        if timeout is not None:
                            timeout = self._timeout(ctx)
                        continue
                    code, details = e.code(), e.details() or ""
                    if attempt and self._retriable(e, replica):
                        gw_err = True
                        raise errors.replica_unreachable(app, dep, attempt + 1, details) from None
                    await ctx.abort(code, details, self._trailers(e.trailing_metadata(), rid))
                except asyncio.CancelledError:
                    if call is not None:
                        call.cancel()
                    code = self._cancel_code(ctx)
                    raise
                finally:
                    router.release(replica)
        except GatewayError as e:
            code, details, gw_err = e.code, e.details, True
            rid = rid or e.request_id
            trailers = self._trailers((), rid) if rid else ()
            await ctx.abort(e.code, e.details, trailers)
        except asyncio.CancelledError:
            code = self._cancel_code(ctx)
            raise
        finally:
            self.ongoing -= 1
            if shape != UNARY_UNARY:
                req_size = counted.size
            rec = CallRecord(
                app, dep, rep_id, path, label, code, details, time.perf_counter() - t0, wall,
                rid, req_size, len(response) if response is not None else 0, gw_err,
                request if captured else None, response if captured else None,
            )
            self._finish(rec)
            if stream is not None:
                stream.done(rec, response)
        return None  # pragma: no cover - abort raises

    async def _forward_stream(
        self, path: str, label: str, shape: int, request: Any, ctx: Any
    ) -> AsyncIterator[bytes]:
        """Server-streaming and bidi calls (and calls of unknown shape)."""
        t0 = time.perf_counter()
        wall = time.time()
        self.ongoing += 1
        app = dep = rep_id = ""
        rid = ""
        code = OK
        details = ""
        gw_err = False
        sent = 0
        stream: Any = None
        if shape == UNARY_STREAM:
            req_size = len(request)
        else:
            request = counted = _Counted(request)
            req_size = 0
        try:
            route, rid, md = self._prepare(ctx)
            app, dep = route.name, route.deployment
            if route.stream_capture is not None:
                stream = route.stream_capture(path)
                request = request if stream is None else stream.requests_of(request)
            router = route.router
            if label is OTHER and router.methods_known:
                # Answered here: a replica rejecting a call it cannot parse races with the
                # request stream we would open to it, and grpc then reports INTERNAL.
                raise errors.method_not_found(path, app)
            timeout = self._timeout(ctx)
            replica: Replica | None = None
            attempt = 0
            while True:
                replica = await router.acquire(timeout, exclude=replica)
                rep_id = replica.replica_id
                call = replica.callable(path, shape)(request, metadata=md, timeout=timeout)
                got_any = False
                try:
                    async for msg in call:
                        got_any = True
                        sent += len(msg)
                        if stream is not None:
                            stream.response(msg)
                        yield msg
                    ctx.set_trailing_metadata(self._trailers(await call.trailing_metadata(), rid))
                    return
                except grpc.aio.AioRpcError as e:
                    if (
                        shape == UNARY_STREAM
                        and not got_any
                        and attempt < self.retries
                        and self._retriable(e, replica)
                    ):
                        attempt += 1
                        if self.on_unreachable is not None:
                            self.on_unreachable(replica)
                        if timeout is not None:
                            timeout = self._timeout(ctx)
                        continue
                    code, details = e.code(), e.details() or ""
                    await ctx.abort(code, details, self._trailers(e.trailing_metadata(), rid))
                except (asyncio.CancelledError, GeneratorExit):
                    call.cancel()
                    code = self._cancel_code(ctx)
                    raise
                finally:
                    router.release(replica)
        except GatewayError as e:
            code, details, gw_err = e.code, e.details, True
            rid = rid or e.request_id
            trailers = self._trailers((), rid) if rid else ()
            await ctx.abort(e.code, e.details, trailers)
        except asyncio.CancelledError:
            code = self._cancel_code(ctx)
            raise
        finally:
            self.ongoing -= 1
            if shape != UNARY_STREAM:
                req_size = counted.size
            rec = CallRecord(
                app, dep, rep_id, path, label, code, details, time.perf_counter() - t0, wall,
                rid, req_size, sent, gw_err,
            )
            self._finish(rec)
            if stream is not None:
                stream.done(rec)
