"""The forwarding core: admit a call (routed by routing.py), pick a replica, forward it as
bytes, retry what never reached a replica, map every failure to one status, record the call.

Hot path rules: no protobuf decoding, no blocking I/O, no per-call formatting for disabled
features. The two drivers (`forward_unary`: one response; `forward_stream`: a response
stream) differ only in how the bytes flow; admission, deadlines, retries, statuses and the
`CallRecord` are shared (`_CallState` and the methods below).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from gateway.dataplane import errors
from gateway.dataplane.call import (
    HOP_BY_HOP,
    CallRecord,
    Counted,
    Observer,
    trailers,
)
from gateway.dataplane.errors import GatewayError
from gateway.dataplane.method_warnings import note_known_method, note_unknown_method
from gateway.dataplane.methods import OTHER, MethodTable
from gateway.dataplane.models_report import take_report
from gateway.dataplane.mux import never_started
from gateway.dataplane.peek import Rest, StreamingMethods, peek_single
from gateway.dataplane.replicas import STREAM_STREAM, UNARY_STREAM, UNARY_UNARY, Replica
from gateway.dataplane.routing import AppRoute, route_call

log = logging.getLogger("gateway.proxy")

OK = grpc.StatusCode.OK
CANCELLED = grpc.StatusCode.CANCELLED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
HOLD_REFUSAL_S = 2.0
"""Bound on how long a refusal waits for `Proxy.refusal_gate` (the gateway opens it sooner)."""
HOLD_MARGIN_S = 0.01
"""A held refusal is answered this long (or a fifth of the time left) before its deadline."""


def _upstream_cut() -> bool:
    """A CancelledError that did not come from cancelling this handler: the upstream call was
    cancelled under it (its replica's channel closed when a scale-down, roll or stop outran the
    grace). The client is still there and must get a status, not silence."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class _CallState:
    """One call's bookkeeping, from its arrival to its `CallRecord`."""

    __slots__ = ("admitted", "app", "code", "counted", "dep", "details", "gw_err", "http",
                 "label", "mid", "path", "rep_id", "req_size", "rid", "router", "shape", "stream",
                 "t0", "wall")

    def __init__(self, path: str, label: str, shape: int, http: bool) -> None:
        self.t0 = time.perf_counter()
        self.http = http
        self.mid: str | None = None
        """The call's multiplexed model id (routes it to a replica holding that model)."""
        self.router: Any = None
        """Its deployment's router: the record names the model id only if it multiplexes."""
        self.wall = time.time()
        self.path = path
        self.label = label
        self.shape = shape
        self.admitted = False
        self.app = self.dep = self.rep_id = self.rid = self.details = ""
        self.code = OK
        self.gw_err = False
        self.req_size = 0
        self.counted: Counted | None = None
        self.stream: Any = None
        """The record pipeline's keeper of a sampled streaming call's messages, or None."""


class Forwarder:
    """The proxy's per-call machinery and the state it counts (gateway/dataplane/proxy.py)."""

    def __init__(self, methods: MethodTable, retries: int = 2,
                 request_timeout_s: float | None = None) -> None:
        self.methods = methods
        self.retries = retries
        self.request_timeout_s = request_timeout_s
        self.routes: dict[str, AppRoute] = {}
        self.known_seen: set[str] = set()
        """Applications whose router has `known_method_seen` (cleared on methods_learned)."""
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
        """Calls refused because the gateway is draining."""
        self.cut_at_stop = False
        """Set by the drain when calls outlive its grace: grpc then cancels their handlers and
        the clients see UNAVAILABLE, which is what they are recorded as (not CANCELLED)."""
        self.streaming = StreamingMethods()
        """Unknown methods whose calls proved lately to stream: not peeked at (peek.py)."""
        self.on_unreachable: Callable[[Replica], None] | None = None
        """Called when a replica could not be reached, so the controller re-checks it."""

    # -- the two drivers -------------------------------------------------------------------

    async def forward_unary(
        self, path: str, label: str, shape: int, request: Any, ctx: Any, http: bool = False
    ) -> bytes | None:
        """Unary and client-streaming calls: one response (or a status) comes back."""
        c = _CallState(path, label, shape, http)
        self.ongoing += 1
        if shape == UNARY_UNARY:
            c.req_size = len(request)
        else:
            request = c.counted = Counted(request)
        response: bytes | None = None
        captured = False
        try:
            route, md, request = self._admit(c, ctx, request)
            captured = route.capture is not None and shape == UNARY_UNARY and route.capture(path)
            deadline = self._deadline(ctx)
            router = route.router
            replica: Replica | None = None
            attempt = 0
            while True:
                # The common case needs no await: a replica with room is there.
                picked = router.take(c.mid) if replica is None else None
                if picked is None:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    replica = await router.acquire(left, exclude=replica, model_id=c.mid)
                else:
                    replica = picked
                c.rep_id = replica.replica_id
                call = None
                try:
                    timeout = self._left(deadline, c)
                    call = replica.callable(path, shape)(request, metadata=md, timeout=timeout)
                    response = await call
                    initial = await call.initial_metadata()
                    if initial:
                        await _send_initial(ctx, initial)
                    trailing = await call.trailing_metadata()
                    take_report(replica, trailing)
                    ctx.set_trailing_metadata(trailers(trailing, c.rid))
                    return response
                except grpc.aio.AioRpcError as e:
                    if await self._upstream_failed(c, ctx, replica, e, attempt,
                                                   resend=shape == UNARY_UNARY, initial=True):
                        attempt += 1
                        continue
                except asyncio.CancelledError as e:
                    self._cut(c, ctx, call, e)
                    raise
                finally:
                    router.release(replica)
        except BaseException as e:
            await self._failed(c, ctx, e)
            raise
        finally:
            rec = self._finish(c, len(response) if response is not None else 0,
                               request if captured else None, response if captured else None)
            if c.stream is not None:
                c.stream.done(rec, response)
        return None  # pragma: no cover - abort raises

    async def forward_stream(
        self, path: str, label: str, shape: int, request: Any, ctx: Any, http: bool = False
    ) -> AsyncIterator[bytes]:
        """Server-streaming and bidi calls (and calls of unknown shape)."""
        c = _CallState(path, label, shape, http)
        self.ongoing += 1
        if shape == UNARY_STREAM:
            c.req_size = len(request)
        else:
            request = c.counted = Counted(request)
        sent = 0
        rest: Rest | None = None
        try:
            route, md, request = self._admit(c, ctx, request)
            router = route.router
            if label is OTHER and router.methods_known:
                # Answered here: a replica rejecting a call it cannot parse races with the
                # request stream we would open to it, and grpc then reports INTERNAL.
                raise errors.method_not_found(path, c.app)
            up_shape = shape
            if label is OTHER and shape == STREAM_STREAM and c.stream is None:
                key = (c.app, path)
                if key in self.streaming:
                    # Known to stream: no peek; still watched, so it stays remembered.
                    request = rest = Rest([], request.__aiter__(), key, self.streaming)
                else:
                    # One message and its end: upstream as unary-stream, far cheaper.
                    single, rest = await peek_single(request, key, self.streaming)
                    if single is not None:
                        request, up_shape = single, UNARY_STREAM
                    else:
                        request = rest
            deadline = self._deadline(ctx)
            replica: Replica | None = None
            attempt = 0
            while True:
                picked = router.take(c.mid) if replica is None else None
                if picked is None:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    replica = await router.acquire(left, exclude=replica, model_id=c.mid)
                else:
                    replica = picked
                c.rep_id = replica.replica_id
                call = None
                got_any = False
                try:
                    timeout = self._left(deadline, c)
                    call = replica.callable(path, up_shape)(request, metadata=md,
                                                            timeout=timeout)
                    initial = await call.initial_metadata()
                    if initial:
                        await _send_initial(ctx, initial)
                    async for msg in call:
                        if not got_any:
                            got_any = True
                            if rest is not None:
                                rest.answered()
                        sent += len(msg)
                        if c.stream is not None:
                            c.stream.response(msg)
                        yield msg
                    trailing = await call.trailing_metadata()
                    take_report(replica, trailing)
                    ctx.set_trailing_metadata(trailers(trailing, c.rid))
                    return
                except grpc.aio.AioRpcError as e:
                    resend = up_shape == UNARY_STREAM and not got_any
                    if await self._upstream_failed(c, ctx, replica, e, attempt,
                                                   resend=resend, initial=False):
                        attempt += 1
                        continue
                except (asyncio.CancelledError, GeneratorExit) as e:
                    self._cut(c, ctx, call, e)
                    raise
                finally:
                    router.release(replica)
        except BaseException as e:
            await self._failed(c, ctx, e)
            raise
        finally:
            rec = self._finish(c, sent, None, None)
            if c.stream is not None:
                c.stream.done(rec)

    # -- shared by both --------------------------------------------------------------------

    def _admit(self, c: _CallState, ctx: Any, request: Any) -> tuple[AppRoute, list[Any], Any]:
        """Route the call (or raise its refusal); the metadata to forward and the request,
        wrapped to keep its messages when the call is sampled."""
        route, rid, md, mid, err = route_call(ctx, self.routes, self.default_route)
        if self.draining:
            self.drain_refusals += 1
            err = errors.draining()
        if err is not None:
            err.request_id = rid  # so the refusal is logged and answered with its request id
            if route is not None:
                err.application, err.deployment = route.name, route.deployment
            raise err
        assert route is not None
        c.rid = rid
        c.admitted = True
        self.admitted += 1
        c.app, c.dep = route.name, route.deployment
        if mid is None and route.model_id_of is not None and c.shape == UNARY_UNARY:
            mid = route.model_id_of(c.path, request)
            if mid is not None:  # the replica sees it as if the client had sent the key
                md.append(("multiplexed_model_id", mid))
        c.mid = mid
        c.router = route.router
        if route.stream_capture is not None and c.shape != UNARY_UNARY:
            c.stream = route.stream_capture(c.path)
            if c.stream is not None:
                request = c.stream.requests_of(request)
        return route, md, request

    async def _upstream_failed(self, c: _CallState, ctx: Any, replica: Replica,
                               e: grpc.aio.AioRpcError, attempt: int, resend: bool,
                               initial: bool) -> bool:
        """True: try another replica (the call never reached this one and can be sent again).
        Otherwise the replica's status goes to the client (this raises)."""
        unsent = never_started(e)
        take_report(replica, e.trailing_metadata())
        if resend and unsent and attempt < self.retries:
            if self.on_unreachable is not None:
                self.on_unreachable(replica)
            return True
        c.code, c.details = e.code(), e.details() or ""
        if attempt and unsent:
            raise errors.replica_unreachable(c.app, c.dep, attempt + 1, c.details) from None
        if initial and e.initial_metadata():
            await _send_initial(ctx, e.initial_metadata())
        await ctx.abort(c.code, c.details, trailers(e.trailing_metadata(), c.rid))
        raise AssertionError("abort raises")  # pragma: no cover

    def _cut(self, c: _CallState, ctx: Any, call: Any, e: BaseException) -> None:
        """The call was cancelled while upstream: by its client, its deadline, the drain, or
        (a replica going away under it) by nobody here, which the client hears about."""
        if call is not None:
            call.cancel()
        if isinstance(e, asyncio.CancelledError) and _upstream_cut():
            raise errors.replica_lost(c.app, c.dep, c.rep_id) from None
        c.code = self._cancel_code(ctx)

    async def _failed(self, c: _CallState, ctx: Any, e: BaseException) -> None:
        """Answer and record what ended the call; returns when `e` is to be raised as it is."""
        if isinstance(e, GatewayError):
            c.code, c.details, c.gw_err = e.code, e.details, True
            c.rid = c.rid or e.request_id
            c.app, c.dep = c.app or e.application, c.dep or e.deployment
            if self.refusal_gate is not None and not c.admitted:
                await self._hold_refusal(self.refusal_gate, ctx)
            await ctx.abort(e.code, e.details, trailers((), c.rid) if c.rid else ())
        elif isinstance(e, asyncio.CancelledError):
            c.code = self._cancel_code(ctx)
        elif isinstance(e, grpc.aio.AbortError) or not isinstance(e, Exception):
            return
        elif c.code is OK:
            # A gateway bug: answered and recorded as what it is. (With a status decided,
            # only sending it failed: the client is gone, and `e` goes up as it is.)
            log.error("call %s failed in the gateway", c.path, exc_info=e)
            err = errors.internal(e)
            c.code, c.details, c.gw_err = err.code, err.details, True
            await ctx.abort(err.code, err.details, trailers((), c.rid) if c.rid else ())

    def _finish(self, c: _CallState, response_bytes: int, request: bytes | None,
                response: bytes | None) -> CallRecord:
        self.ongoing -= 1
        if c.admitted:
            self.admitted -= 1
        req_size = c.counted.size if c.counted is not None else c.req_size
        label = c.label
        if label is OTHER:
            # Its own name once a replica answered it (bounded, see label_unknown); a method a
            # replica has, unknown to the gateway, warns (`gateway status`, logged once).
            answered = bool(c.rep_id) and not c.gw_err and c.code is not UNIMPLEMENTED
            label = self.methods.label_unknown(c.path, answered)
            route = self.routes.get(c.app) if answered else None
            if route is not None and not route.router.unknown_method:
                note_unknown_method(route.router, c.path)
        elif c.app not in self.known_seen and c.rep_id and c.code is not UNIMPLEMENTED:
            # Once per application: its replicas serve methods the gateway knows.
            note_known_method(self.routes.get(c.app), self.known_seen, c.app)
        rec = CallRecord(
            c.app, c.dep, c.rep_id, c.path, label, c.code, c.details,
            time.perf_counter() - c.t0, c.wall, c.rid, req_size, response_bytes, c.gw_err,
            request, response, c.http,
            # Only a multiplexed deployment's records are named by the client's model id.
            c.mid if c.router is not None and c.router.affinity is not None else None,
        )
        for obs in self.observers:
            try:
                obs(rec)
            except Exception:  # an observer must never break the call path
                log.exception("call observer failed")
        return rec

    async def _hold_refusal(self, gate: asyncio.Event, ctx: Any) -> None:
        """Answer a refusal only once the gateway has begun shutting its listener down, or
        just before the client's deadline: it gets the UNAVAILABLE it may retry elsewhere,
        not a DEADLINE_EXCEEDED the gateway would not have recorded."""
        hold = HOLD_REFUSAL_S
        left = ctx.time_remaining()
        if left is not None:
            hold = min(hold, left - max(HOLD_MARGIN_S, left * 0.2))
        if hold <= 0:
            return
        try:
            await asyncio.wait_for(gate.wait(), hold)
        except TimeoutError:
            pass

    def _cancel_code(self, ctx: Any) -> grpc.StatusCode:
        """grpc cancels the handler when the client cancels, when its deadline ends, and when
        the server stops with calls still running (a drain past its grace)."""
        remaining = ctx.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        # An HTTP call's context knows whether the stop cut it (gateway/ingress/http).
        cut = getattr(ctx, "cut", None)
        if self.cut_at_stop if cut is None else cut:
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
    def _left(deadline: float | None, c: _CallState) -> float | None:
        """What remains of `deadline` for the upstream call; DEADLINE_EXCEEDED once gone."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise errors.deadline_in_queue(c.app, c.dep)
        return left


async def _send_initial(ctx: Any, initial: Any) -> None:
    """The replica's initial metadata goes to the client as the gateway's own."""
    out = [(k, v) for k, v in initial if k not in HOP_BY_HOP]
    if out:
        await ctx.send_initial_metadata(out)
