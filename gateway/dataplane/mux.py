"""Unary calls to local replicas multiplexed over one long-lived bidi stream.

A gRPC unary call costs ~170 us of client CPU and ~245 us of server CPU here, while one message
on an open stream costs ~70 us a side; and frames that are ready together travel in one stream
message (never more than `max_message_bytes`, see mux_frames.py). So the gateway sends
each unary call to a replica it started itself as a `MuxFrame` on a `ReplicaControl/Mux`
stream, and the replica runtime unpacks it and calls the servicer's handler directly (see
gateway/runtime/mux_server.py). Status codes, details, initial and trailing metadata, deadlines and
cancellation keep the semantics of a plain gRPC call: the core tests run over this path.

Client side: `MuxChannel` / `MuxCall` (used by `Replica`). Server side: `MuxServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Generator
from typing import Any

import grpc

from gateway.dataplane.mux_frames import (
    CALL,
    CANCEL,
    MAX_BATCH_FRAMES,
    RESULT,
    Reassembler,
    batches,
    from_lists,
    to_lists,
)
from gateway.pb import replica_control_pb2 as pb
from gateway.runtime.mux_context import MuxContext
from gateway.runtime.mux_server import MuxServer, capture_unary_handlers

__all__ = [
    "CALL",
    "CANCEL",
    "MAX_BATCH_FRAMES",
    "MUX_METHOD",
    "RESULT",
    "MuxCall",
    "MuxChannel",
    "MuxContext",
    "MuxRpcError",
    "MuxServer",
    "capture_unary_handlers",
    "never_started",
]

log = logging.getLogger("gateway.mux")

MUX_METHOD = "/gateway.internal.ReplicaControl/Mux"
LINGER_S = 0.001
"""With more than LINGER_MIN_CALLS calls in flight on a stream, a new call waits up to this
long for others to share its write. Each stream write costs the gateway ~150 us and the
replica a read; under load calls arrive one per event-loop turn, so without a wait nearly
every write carried one call (measured 1.03 frames per write at 16 concurrent calls; with
1 ms, 2.2, and gateway CPU per call -20%, replica CPU -35%). The calls in flight already wait
for each other's turns; a lone call never waits (c1 latency is unchanged)."""
LINGER_MIN_CALLS = 1
LINGER_MAX_FRAMES = 16
"""Frames that end the wait at once: a write full enough."""
LINGER_MISSES = 5
LINGER_BACKOFF_S = 0.25
"""After LINGER_MISSES waits in a row that no other call joined (one slow call in flight
beside one-at-a-time calls), calls do not wait for this long."""
DEAD_MIN = 16
"""Queued frames of dropped calls tolerated before the queue is rebuilt without them."""
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_EMPTY_MD = grpc.aio.Metadata()

# How grpc reports a call that never left: no connection could be made (the pick failed).
_NOT_CONNECTED = ("failed to connect to all addresses", "DNS resolution failed")


def never_started(e: grpc.aio.AioRpcError) -> bool:
    """True when `e` proves the call never reached a server: no connection was ever made.

    A replica that received a call and then died looks like any other lost connection
    ("Socket closed", "Connection reset"), so only a failed connect counts, as with Envoy's
    `reset-before-request` and gRPC's transparent retries.
    """
    if e.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    if isinstance(e, MuxRpcError):
        return not e.sent
    return (e.details() or "").startswith(_NOT_CONNECTED) and not e.initial_metadata()


class MuxRpcError(grpc.aio.AioRpcError):
    """An `AioRpcError` that also says whether the replica could have received the call."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing: Any = (),
        sent: bool = True,
        initial: Any = (),
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            code,
            grpc.aio.Metadata(*initial) if initial else _EMPTY_MD,
            grpc.aio.Metadata(*trailing),
            details,
        )
        self.sent = sent


# -- gateway side --------------------------------------------------------------------------


class MuxCall:
    """The awaitable a unary mux call returns; shaped like a `grpc.aio.UnaryUnaryCall`."""

    __slots__ = ("_chan", "_frame", "_future", "_timer", "call_id", "deadline", "sent")

    def __init__(
        self, chan: MuxChannel, call_id: int, frame: pb.MuxFrame, deadline: float | None
    ) -> None:
        self._chan = chan
        self.call_id = call_id
        self._frame = frame
        self._future: asyncio.Future[pb.MuxFrame] = chan.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.deadline = deadline
        self.sent = False
        """True from the moment a write carrying the call began: the replica may have it."""

    def __await__(self) -> Generator[Any, None, bytes]:
        try:
            frame = yield from self._future.__await__()
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
        if frame.code == 0:
            return frame.payload
        code = _CODES.get(frame.code, grpc.StatusCode.UNKNOWN)
        raise MuxRpcError(
            code,
            frame.details,
            from_lists(frame.md_keys, frame.md_values),
            initial=from_lists(frame.initial_md_keys, frame.initial_md_values),
        )

    async def initial_metadata(self) -> grpc.aio.Metadata:
        frame = await self._future
        if not frame.initial_md_keys:
            return _EMPTY_MD
        return grpc.aio.Metadata(*from_lists(frame.initial_md_keys, frame.initial_md_values))

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        frame = await self._future
        return grpc.aio.Metadata(*from_lists(frame.md_keys, frame.md_values))

    def _fail(self, err: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(err)

    def _expire(self) -> None:
        if not self._future.done():
            self._chan.forget(self, send_cancel=True)
            self._fail(MuxRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def cancel(self) -> bool:
        # The future may already be cancelled (its awaiting task was): what counts is whether
        # the replica still owes an answer, i.e. whether the call is still registered.
        pending = self._chan.forget(self, send_cancel=True)
        self._future.cancel()
        return pending


class MuxChannel:
    """The gateway's end of one mux stream to a local replica, opened on first use."""

    def __init__(self, channel: grpc.aio.Channel, max_message_bytes: int = 16 << 20) -> None:
        self.channel = channel
        self.max_message_bytes = max_message_bytes
        self.loop = asyncio.get_event_loop()
        self._ids = itertools.count(1)
        self._calls: dict[int, MuxCall] = {}
        self._pending: list[pb.MuxFrame] = []
        self._dead = 0
        """Frames in `_pending` whose calls were dropped before they left (about)."""
        self.writing = False
        """True while a write runs or is about to (a flush task, or the linger timer)."""
        self._linger: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Future[None] | None = None
        """The flush task that owns `writing` (None while a linger timer owns it)."""
        self._linger_misses = 0
        self._linger_off = 0.0
        """Loop time until which calls do not wait (see _linger_over)."""
        self._stream: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.on_models: Any = None
        """Called with (model ids, capacity) when a result reports the replica's multiplexed
        models, and with (None, None) when the stream ends (gateway/runtime/multiplex.py)."""

    def _ensure_stream(self) -> None:
        if self._stream is not None or self._closed:
            return
        self._stream = self.channel.stream_stream(MUX_METHOD)()  # type: ignore[call-arg]
        stream = self._stream
        reader = asyncio.ensure_future(self._reader(stream))
        self._tasks.add(reader)
        reader.add_done_callback(self._tasks.discard)

    def unary(self, path: str, request: bytes, metadata: Any, timeout: float | None) -> MuxCall:
        if self._closed:
            raise MuxRpcError(grpc.StatusCode.UNAVAILABLE, "replica connection closed", sent=False)
        call_id = next(self._ids)
        keys, values = to_lists(metadata)
        frame = pb.MuxFrame(
            call_id=call_id, kind=CALL, method=path, md_keys=keys, md_values=values,
            payload=request,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        call = MuxCall(self, call_id, frame, deadline)
        if len(request) > self.max_message_bytes:
            # What grpc answers for a message over its send limit; the stream is not involved.
            call._fail(
                MuxRpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Sent message larger than max ({len(request)} vs. {self.max_message_bytes})",
                    sent=False,
                )
            )
            return call
        self._ensure_stream()
        self._calls[call_id] = call
        if timeout is not None:
            call._timer = self.loop.call_later(timeout, call._expire)
        self._pending.append(frame)
        if not self.writing:
            if len(self._calls) > LINGER_MIN_CALLS and self.loop.time() >= self._linger_off:
                # Under load, wait a moment for more calls to share the write (see LINGER_S).
                self.writing = True
                self._linger = self.loop.call_later(LINGER_S, self._linger_over)
            else:
                self._start_flush()
        elif self._linger is not None and len(self._pending) >= LINGER_MAX_FRAMES:
            self._linger.cancel()
            self._linger_over()
        return call

    def _linger_over(self) -> None:
        self._linger = None
        if len(self._pending) > 1:
            self._linger_misses = 0
        else:
            # Nobody joined: the calls in flight are long ones, not a stream of new calls.
            # After a few such waits, stop waiting for a while (a lone call never waits).
            self._linger_misses += 1
            if self._linger_misses >= LINGER_MISSES:
                self._linger_misses = 0
                self._linger_off = self.loop.time() + LINGER_BACKOFF_S
        self._start_flush()

    def forget(self, call: MuxCall, send_cancel: bool) -> bool:
        """Drop `call`; tell the replica to stop working on it. False if it had finished."""
        if self._calls.pop(call.call_id, None) is None:
            return False
        if not call.sent:
            # Its frame (no longer wanted, see _live) must not stay queued, payload and all,
            # while a stalled replica takes no write and expired calls make room for new ones:
            # the queue is rebuilt once most of it is dead (amortised, not a scan per call).
            self._dead += 1
            if self._dead > DEAD_MIN and self._dead * 2 > len(self._pending):
                calls = self._calls
                self._pending = [f for f in self._pending
                                 if f.kind != CALL or f.call_id in calls]
                self._dead = 0
        elif send_cancel:
            self._pending.append(pb.MuxFrame(call_id=call.call_id, kind=CANCEL))
            if not self.writing:
                self._start_flush()
        return True

    def _start_flush(self) -> None:
        # Writes run in a task of their own, never in a caller's: a caller cancelled in the
        # middle of a stream write would cancel the write and with it the whole stream.
        # Frames queued while it writes go out with its next write (batching under load).
        self.writing = True
        task = self._flusher = asyncio.ensure_future(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _live(self, frames: list[pb.MuxFrame]) -> Generator[pb.MuxFrame, None, None]:
        """The frames still wanted, checked as late as possible; CALLs get their time left."""
        calls = self._calls
        for f in frames:
            if f.kind != CALL:
                yield f
                continue
            call = calls.get(f.call_id)
            if call is None:
                continue  # cancelled before it left: it needs no frame at all
            if call.deadline is not None:
                # What remains now, not when the call was made (it may have waited here).
                f.timeout_s = max(call.deadline - time.monotonic(), 1e-3)
            yield f

    def _refused(self, frame: pb.MuxFrame) -> None:
        """A call whose metadata alone cannot fit one stream message fails on its own."""
        call = self._calls.pop(frame.call_id, None)
        if call is not None:
            call._fail(
                MuxRpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request metadata larger than max ({self.max_message_bytes} bytes)",
                    sent=False,
                )
            )

    async def flush(self) -> None:
        """Write every pending frame, in batches that fit; only one flush runs at a time."""
        stream = self._stream
        if stream is None:
            self._flush_over()
            return
        calls = self._calls
        try:
            while self._pending:
                frames, self._pending = self._pending, []
                self._dead = 0
                for batch in batches(self._live(frames), self.max_message_bytes, self._refused):
                    out = []
                    for f in batch:
                        if f.kind == CALL:
                            c = calls.get(f.call_id)
                            if c is None:
                                continue  # cancelled meanwhile (the replica drops any pieces)
                            # Sent from the moment the write starts: a cancel arriving during
                            # the write must reach the replica (its CANCEL follows).
                            c.sent = True
                        out.append(f)
                    if out:
                        await stream.write(pb.MuxBatch(frames=out).SerializeToString())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
            if stream is self._stream:
                self._broken(e)
        finally:
            self._flush_over()

    def _flush_over(self) -> None:
        # Only the current flush clears the flag: one the stream's end already replaced
        # (see _broken) must not let a second flush start beside the new one.
        if self._flusher is asyncio.current_task():
            self._flusher = None
            self.writing = False

    async def _reader(self, stream: Any) -> None:
        calls = self._calls
        parts = Reassembler()
        try:
            while True:
                data = await stream.read()
                if data is grpc.aio.EOF:  # type: ignore[attr-defined]
                    self._broken(None)
                    return
                for piece in pb.MuxBatch.FromString(data).frames:
                    frame = parts.feed(piece) if piece.more or parts else piece
                    if frame is None:
                        continue
                    if frame.models_report and self.on_models is not None:
                        self.on_models(frame.models, frame.max_models)
                    call = calls.pop(frame.call_id, None)
                    if call is not None and not call._future.done():
                        call._future.set_result(frame)
        except grpc.aio.AioRpcError as e:
            self._broken(e)
        except asyncio.CancelledError:
            pass

    def _broken(self, err: BaseException | None) -> None:
        """The stream ended: fail every call on it; the next call opens a new stream."""
        why = err.details() if isinstance(err, grpc.aio.AioRpcError) else "stream ended"
        # A stream that never connected delivered nothing: its calls are safe to retry.
        unsent = isinstance(err, grpc.aio.AioRpcError) and (why or "").startswith(_NOT_CONNECTED)
        self._stream = None
        # A flush task cancelled below before its first step never runs its `finally`, and a
        # pending linger would flush a stream that is gone: reset both here, or the next
        # calls queue behind a write that never comes.
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self.writing = False
        self._flusher = None
        if self.on_models is not None:
            self.on_models(None, None)  # a new stream (or process) reports afresh
        for t in list(self._tasks):
            if t is not asyncio.current_task():
                t.cancel()
        calls, self._calls = self._calls, {}
        self._pending = []
        self._dead = 0
        for call in calls.values():
            call._fail(
                MuxRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"lost connection to replica: {why}",
                    sent=call.sent and not unsent,
                )
            )

    async def close(self) -> None:
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._stream is not None:
            self._stream.cancel()
        self._broken(None)
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
