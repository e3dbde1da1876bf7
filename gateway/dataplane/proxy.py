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

from gateway.dataplane import errors
from gateway.dataplane.errors import GatewayError
from gateway.dataplane.methods import OTHER, MethodInfo, MethodTable
from gateway.dataplane.mux import never_started
from gateway.dataplane.replicas import (
    STREAM_STREAM,
    STREAM_UNARY,
    UNARY_STREAM,
    UNARY_UNARY,
    Replica,
)
from gateway.dataplane.router import Router

log = logging.getLogger("gateway.proxy")

OK = grpc.StatusCode.OK
CANCELLED = grpc.StatusCode.CANCELLED

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
HOLD_REFUSAL_S = 2.0
"""Bound on how long a refusal waits for `Proxy.refusal_gate` (the gateway opens it sooner)."""


def valid_request_id(rid: str) -> bool:
    """1-512 printable ASCII characters, no spaces: safe in logs, labels and trailers."""
    return (
        len(rid) <= MAX_REQUEST_ID_LEN and rid.isascii() and rid.isprintable() and " " not in rid
    )


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
    model_id: str | None = None
    """The call's `multiplexed_model_id`, when it had one."""


Observer = Callable[[CallRecord], None]


def _upstream_cut() -> bool:
    """A CancelledError that did not come from cancelling this handler: the upstream call was
    cancelled under it (its replica's channel closed when a scale-down, roll or stop outran the
    grace). The client is still there and must get a status, not silence."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


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

    __slots__ = ("capture", "deployment", "model_id_of", "name", "router", "stream_capture")

    def __init__(self, name: str, router: Router) -> None:
        self.name = name
        self.deployment = router.deployment
        self.router = router
        self.capture: Callable[[str], bool] | None = None
        """Set by the record pipeline: decides per method whether to keep the payloads."""
        self.stream_capture: Callable[[str], Any] | None = None
        """Set by the record pipeline: for a sampled streaming call, an object that keeps its
        messages (`requests_of`, `response`, `done`; gateway/record_capture.py), else None."""
        self.model_id_of: Callable[[str, Any], str | None] | None = None
        """Set for `multiplexed_model_id_from: oip_model_name` (dataplane/oip_model_id.py)."""


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
        self.admitted = 0
        """Calls in flight that were accepted (not refused): what a drain waits for."""
        self.draining = False
        self.refusal_gate: asyncio.Event | None = None
        """Set by the gateway for the end of a drain (Gateway._shut_listener): a call refused
        while draining waits for it (at most HOLD_REFUSAL_S), so its client is not sending
        another call at the moment grpc shuts the listener down."""
        self.drain_refusals = 0
        self.cut_at_stop = False
        """Set by the drain when calls outlive its grace: grpc then cancels their handlers and
        the clients see UNAVAILABLE, which is what they are recorded as (not CANCELLED)."""
        """Calls refused because the gateway is draining."""
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

    def _prepare(self, ctx: Any) -> tuple[AppRoute, str, list[tuple[str, Any]], str | None]:
        """Route, request id and the metadata to forward.

        A refusal still carries what is known (application, deployment, a request id), so
        it is answered, counted and logged with them.
        """
        app: str | None = None
        rid: str | None = None
        rid_key = "x-request-id"
        alt: str | None = None
        mid: str | None = None  # routes by model (gateway/dataplane/model_affinity.py)
        fwd: list[tuple[str, Any]] = []
        for key, value in ctx.invocation_metadata() or ():
            if key in HOP_BY_HOP:
                continue
            if key == "application":
                app = value
            elif key == "x-request-id":
                if rid is None:
                    rid = value
                continue
            elif key == "request_id":
                if alt is None:
                    alt = value
                continue
            elif key == "multiplexed_model_id" and mid is None:
                mid = value  # the first, as the replica reads it
            fwd.append((key, value))
        if not rid:
            # x-request-id wins over Ray's request_id when both are sent.
            rid, rid_key = alt, "request_id"
        bad: GatewayError | None = None
        if rid and not valid_request_id(rid):
            bad = errors.bad_request_id(rid_key, rid, MAX_REQUEST_ID_LEN)
            rid = None
        if not rid:
            rid = str(uuid.uuid4())
        fwd.append(("x-request-id", rid))
        err: GatewayError | None = None
        route: AppRoute | None = None
        if app is None:
            route = self.default_route
            if route is None:
                err = errors.application_missing(self.routes)
        else:
            route = self.routes.get(app)
            if route is None:
                err = errors.application_unknown(app, self.routes)
        if self.draining:
            self.drain_refusals += 1
            err = errors.draining()
        err = err or bad
        if err is not None:
            err.request_id = rid  # so the refusal is logged and answered with its request id
            if route is not None:
                err.application, err.deployment = route.name, route.deployment
            raise err
        assert route is not None
        return route, rid, fwd, mid

    async def _hold_refusal(self, gate: asyncio.Event) -> None:
        """Answer a refusal only once the gateway has begun shutting its listener down."""
        try:
            await asyncio.wait_for(gate.wait(), HOLD_REFUSAL_S)
        except TimeoutError:
            pass

    def _cancel_code(self, ctx: Any) -> grpc.StatusCode:
        """grpc cancels the handler when the client cancels, when its deadline ends, and when
        the server stops with calls still running (a drain past its grace)."""
        remaining = ctx.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        if self.cut_at_stop:
            return grpc.StatusCode.UNAVAILABLE
        return CANCELLED

    def _deadline(self, ctx: Any) -> float | None:
        """The call's deadline on the monotonic clock: the client's, else request_timeout_s.

        Fixed once per call: time spent queued and failed attempts count against it.
        """
        remaining: float | None = ctx.time_remaining()
        # grpc reports a huge number when the client set no deadline.
        if remaining is None or remaining > 1e8:
            if self.request_timeout_s is None:
                return None
            return time.monotonic() + self.request_timeout_s
        return time.monotonic() + max(remaining, 0.0)

    @staticmethod
    def _left(deadline: float | None, app: str, dep: str) -> float | None:
        """What remains of `deadline` for the upstream call; DEADLINE_EXCEEDED once gone."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise errors.deadline_in_queue(app, dep)
        return left

    @staticmethod
    async def _send_initial(ctx: Any, initial: Any) -> None:
        """The replica's initial metadata goes to the client as the gateway's own."""
        out = [(k, v) for k, v in initial if k not in HOP_BY_HOP]
        if out:
            await ctx.send_initial_metadata(out)

    @staticmethod
    def _trailers(trailing: Any, rid: str) -> tuple[tuple[str, Any], ...]:
        out = [(k, v) for k, v in (trailing or ()) if k not in REQUEST_ID_KEYS]
        out.append(("x-request-id", rid))
        out.append(("request_id", rid))
        return tuple(out)

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
        admitted = False
        app = dep = rep_id = ""
        rid = ""
        mid = None
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
            route, rid, md, mid = self._prepare(ctx)
            admitted = True
            self.admitted += 1
            app, dep = route.name, route.deployment
            if mid is None and route.model_id_of is not None:
                mid = route.model_id_of(path, request)
                if mid is not None:  # the replica sees it as if the client had sent the key
                    md.append(("multiplexed_model_id", mid))
            captured = route.capture is not None and shape == UNARY_UNARY and route.capture(path)
            if route.stream_capture is not None and shape != UNARY_UNARY:
                stream = route.stream_capture(path)
                request = request if stream is None else stream.requests_of(request)
            deadline = self._deadline(ctx)
            router = route.router
            replica: Replica | None = None
            attempt = 0
            while True:
                # The common case needs no await: a replica with room is there.
                picked = router.take(mid) if replica is None else None
                if picked is None:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    replica = await router.acquire(left, exclude=replica, model_id=mid)
                else:
                    replica = picked
                rep_id = replica.replica_id
                call = None
                try:
                    timeout = self._left(deadline, app, dep)
                    call = replica.callable(path, shape)(request, metadata=md, timeout=timeout)
                    response = await call
                    initial = await call.initial_metadata()
                    if initial:
                        await self._send_initial(ctx, initial)
                    ctx.set_trailing_metadata(self._trailers(await call.trailing_metadata(), rid))
                    return response
                except grpc.aio.AioRpcError as e:
                    unsent = never_started(e)
                    if shape == UNARY_UNARY and unsent and attempt < self.retries:
                        attempt += 1
                        if self.on_unreachable is not None:
                            self.on_unreachable(replica)
                        continue
                    code, details = e.code(), e.details() or ""
                    if attempt and unsent:
                        raise errors.replica_unreachable(app, dep, attempt + 1, details) from None
                    if e.initial_metadata():
                        await self._send_initial(ctx, e.initial_metadata())
                    await ctx.abort(code, details, self._trailers(e.trailing_metadata(), rid))
                except asyncio.CancelledError:
                    if call is not None:
                        call.cancel()
                    if _upstream_cut():
                        raise errors.replica_lost(app, dep, rep_id) from None
                    code = self._cancel_code(ctx)
                    raise
                finally:
                    router.release(replica)
        except GatewayError as e:
            code, details, gw_err = e.code, e.details, True
            rid = rid or e.request_id
            app, dep = app or e.application, dep or e.deployment
            if self.refusal_gate is not None and not admitted:
                await self._hold_refusal(self.refusal_gate)
            await ctx.abort(e.code, e.details, self._trailers((), rid) if rid else ())
        except asyncio.CancelledError:
            code = self._cancel_code(ctx)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            if code is not OK:
                raise  # the status was decided; only sending it failed (the client is gone)
            # A gateway bug: answered and recorded as what it is.
            log.exception("call %s failed in the gateway", path)
            err = errors.internal(e)
            code, details, gw_err = err.code, err.details, True
            await ctx.abort(err.code, err.details, self._trailers((), rid) if rid else ())
        finally:
            self.ongoing -= 1
            if admitted:
                self.admitted -= 1
            if shape != UNARY_UNARY:
                req_size = counted.size
            rec = CallRecord(
                app, dep, rep_id, path, label, code, details, time.perf_counter() - t0, wall,
                rid, req_size, len(response) if response is not None else 0, gw_err,
                request if captured else None, response if captured else None, mid,
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
        admitted = False
        app = dep = rep_id = ""
        rid = ""
        mid = None
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
            route, rid, md, mid = self._prepare(ctx)
            admitted = True
            self.admitted += 1
            app, dep = route.name, route.deployment
            if route.stream_capture is not None:
                stream = route.stream_capture(path)
                request = request if stream is None else stream.requests_of(request)
            router = route.router
            if label is OTHER and router.methods_known:
                # Answered here: a replica rejecting a call it cannot parse races with the
                # request stream we would open to it, and grpc then reports INTERNAL.
                raise errors.method_not_found(path, app)
            deadline = self._deadline(ctx)
            replica: Replica | None = None
            attempt = 0
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                replica = await router.acquire(left, exclude=replica, model_id=mid)
                rep_id = replica.replica_id
                call = None
                got_any = False
                try:
                    timeout = self._left(deadline, app, dep)
                    call = replica.callable(path, shape)(request, metadata=md, timeout=timeout)
                    initial = await call.initial_metadata()
                    if initial:
                        await self._send_initial(ctx, initial)
                    async for msg in call:
                        got_any = True
                        sent += len(msg)
                        if stream is not None:
                            stream.response(msg)
                        yield msg
                    ctx.set_trailing_metadata(self._trailers(await call.trailing_metadata(), rid))
                    return
                except grpc.aio.AioRpcError as e:
                    unsent = never_started(e)
                    if shape == UNARY_STREAM and unsent and not got_any and attempt < self.retries:
                        attempt += 1
                        if self.on_unreachable is not None:
                            self.on_unreachable(replica)
                        continue
                    code, details = e.code(), e.details() or ""
                    if attempt and unsent:
                        raise errors.replica_unreachable(app, dep, attempt + 1, details) from None
                    await ctx.abort(code, details, self._trailers(e.trailing_metadata(), rid))
                except (asyncio.CancelledError, GeneratorExit) as e:
                    if call is not None:
                        call.cancel()
                    if isinstance(e, asyncio.CancelledError) and _upstream_cut():
                        raise errors.replica_lost(app, dep, rep_id) from None
                    code = self._cancel_code(ctx)
                    raise
                finally:
                    router.release(replica)
        except GatewayError as e:
            code, details, gw_err = e.code, e.details, True
            rid = rid or e.request_id
            app, dep = app or e.application, dep or e.deployment
            if self.refusal_gate is not None and not admitted:
                await self._hold_refusal(self.refusal_gate)
            await ctx.abort(e.code, e.details, self._trailers((), rid) if rid else ())
        except asyncio.CancelledError:
            code = self._cancel_code(ctx)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            if code is not OK:
                raise  # the status was decided; only sending it failed (the client is gone)
            # A gateway bug: answered and recorded as what it is.
            log.exception("call %s failed in the gateway", path)
            err = errors.internal(e)
            code, details, gw_err = err.code, err.details, True
            await ctx.abort(err.code, err.details, self._trailers((), rid) if rid else ())
        finally:
            self.ongoing -= 1
            if admitted:
                self.admitted -= 1
            if shape != UNARY_STREAM:
                req_size = counted.size
            rec = CallRecord(
                app, dep, rep_id, path, label, code, details, time.perf_counter() - t0, wall,
                rid, req_size, sent, gw_err, None, None, mid,
            )
            self._finish(rec)
            if stream is not None:
                stream.done(rec)
