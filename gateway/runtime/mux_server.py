"""The replica's end of the mux stream: each CALL frame runs through the servicer's own handler.

Calls keep the semantics they have over plain gRPC (see gateway/dataplane/mux.py): async
methods run on the event loop, plain (sync) methods on the loop's default executor as
`grpc.aio` runs them, with a context whose `abort()` raises (gateway/runtime/mux_context.py);
deadlines, cancellation, done callbacks, initial and trailing metadata behave as on a
`grpc.aio` server."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.dataplane.mux_frames import (
    CALL,
    CANCEL,
    RESULT,
    Reassembler,
    batches,
    from_lists,
    to_lists,
)
from gateway.pb import replica_control_pb2 as pb
from gateway.runtime import multiplex
from gateway.runtime.mux_context import MuxAbort, MuxContext, SyncMuxContext

log = logging.getLogger("gateway.mux")


def _is_async(fn: Any) -> bool:
    # The test grpc.aio applies to decide where a handler runs.
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _in_executor(handler: Any) -> Any:
    """`handler` with its sync behaviour run on the loop's default executor, as grpc.aio does."""
    inner = handler.unary_unary

    async def unary_unary(request: Any, context: Any) -> Any:
        ctx = SyncMuxContext(context)
        run = contextvars.copy_context().run  # the caller's log context goes with the call
        return await asyncio.get_running_loop().run_in_executor(None, run, inner, request, ctx)

    return handler._replace(unary_unary=unary_unary)


def capture_unary_handlers(registrars: list[Any], servicer: Any) -> dict[str, Any]:
    """The unary-unary method handlers that generated `add_X_to_server` functions register.

    Handlers of plain (sync) methods come back wrapped to run on executor threads.
    """
    handlers: dict[str, Any] = {}

    class _Recorder:
        def add_generic_rpc_handlers(self, generic: Any) -> None:
            for g in generic:
                for path, h in getattr(g, "_method_handlers", {}).items():
                    handlers.setdefault(path, h)

        def add_registered_method_handlers(self, service: str, method_handlers: Any) -> None:
            for name, h in method_handlers.items():
                handlers[f"/{service}/{name}"] = h

    for add in registrars:
        add(servicer, _Recorder())
    return {
        p: h if _is_async(h.unary_unary) else _in_executor(h)
        for p, h in handlers.items()
        if not h.request_streaming and not h.response_streaming
    }


def _status(code: Any) -> grpc.StatusCode:
    """The status for a code a servicer set: a StatusCode, or its number as grpc accepts."""
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return grpc.StatusCode.UNKNOWN


def _unexpected(frame: pb.MuxFrame, e: Exception) -> tuple[grpc.StatusCode, str]:
    """A servicer bug: logged, and answered as grpc does."""
    log.exception("servicer method %s raised", frame.method)
    return grpc.StatusCode.UNKNOWN, f"Unexpected {type(e)}: {e}"


def _drop(running: dict[int, Any], call_id: int, _task: Any) -> None:
    running.pop(call_id, None)


class MuxServer:
    """The replica's end: run each CALL frame through the servicer's own handler."""

    def __init__(
        self,
        handlers: dict[str, Any],
        max_message_bytes: int,
        on_call: Callable[[str, MuxContext, grpc.StatusCode, float], None] | None = None,
    ) -> None:
        self.handlers = handlers
        self.max_message_bytes = max_message_bytes
        self.on_call = on_call
        """Per finished call (method, context, code, seconds): the replica's access log."""

    def _refused(self, frame: pb.MuxFrame) -> pb.MuxFrame:
        """A result whose metadata alone cannot fit one stream message: fail that call only."""
        return pb.MuxFrame(
            call_id=frame.call_id,
            kind=RESULT,
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            details=f"response metadata larger than max ({self.max_message_bytes} bytes)",
        )

    async def serve(self, request_iterator: Any, context: Any) -> None:
        """The `Mux` stream handler (the generated one: MuxBatch messages in and out)."""
        pending: list[pb.MuxFrame] = []
        running: dict[int, tuple[asyncio.Task[None], MuxContext]] = {}
        peer = context.peer()
        writing = False
        limit = self.max_message_bytes
        reported = 0  # the multiplexed models' version last told the gateway on this stream

        async def done(frame: pb.MuxFrame) -> None:
            # The call that finishes writes, with every other result ready by then; calls
            # finishing during that write leave theirs for it to pick up.
            nonlocal writing, pending, reported
            if multiplex.registry.version != reported:
                # The models this replica holds changed: the gateway routes by them.
                reported = multiplex.registry.version
                ids, cap = multiplex.registry.report()
                frame.models_report = True
                frame.models.extend(ids)
                frame.max_models = cap
            # From here on a CANCEL for this call must not interrupt the write, which may
            # carry other calls' results too.
            running.pop(frame.call_id, None)
            pending.append(frame)
            if writing:
                return
            writing = True
            try:
                # One loop turn first: the other calls of the batch that came in together
                # finish in it, and their results share this write.
                await asyncio.sleep(0)
                while pending:
                    frames, pending = pending, []
                    for batch in batches(frames, limit, self._refused):
                        await context.write(pb.MuxBatch(frames=batch))
            except Exception as e:  # the stream is gone; the gateway fails those calls
                log.debug("mux write failed: %s", e)
            finally:
                writing = False

        async def read_loop() -> None:
            parts = Reassembler()
            while True:
                data = await context.read()
                if data is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                for frame in data.frames:
                    if frame.kind == CALL:
                        if frame.more or parts:
                            frame = parts.feed(frame)
                            if frame is None:
                                continue
                        deadline = (
                            time.monotonic() + frame.timeout_s if frame.timeout_s > 0 else None
                        )
                        ctx = MuxContext(from_lists(frame.md_keys, frame.md_values), deadline, peer)
                        task = asyncio.ensure_future(self._run(frame, ctx, done))
                        running[frame.call_id] = (task, ctx)
                        task.add_done_callback(functools.partial(_drop, running, frame.call_id))
                    elif frame.kind == CANCEL:
                        parts.drop(frame.call_id)
                        entry = running.get(frame.call_id)
                        if entry is not None:
                            entry[1].cancelled_flag = True
                            entry[0].cancel()

        try:
            await read_loop()
            # The gateway closed its side: let calls already running answer.
            while running:
                await asyncio.wait([t for t, _ in running.values()])
        finally:
            for t, ctx in list(running.values()):
                ctx.cancelled_flag = True
                t.cancel()

    async def _run(
        self, frame: pb.MuxFrame, ctx: MuxContext, done: Callable[[pb.MuxFrame], Awaitable[None]]
    ) -> None:
        t0 = time.perf_counter()
        if multiplex._used and multiplex.MODEL_ID_KEY in frame.md_keys:
            # This task's own context: the handler (and a sync one's thread) sees the id.
            multiplex.set_model_id(multiplex.model_id_of(ctx.invocation_metadata()))
        code, details, payload = await self._invoke(frame, ctx)
        ctx._finish()
        if ctx.cancelled_flag:
            return  # the gateway cancelled it: nobody waits for an answer
        try:
            keys, values = to_lists(ctx.trailing_metadata())
            ikeys, ivalues = to_lists(ctx._initial)
            result = pb.MuxFrame(
                call_id=frame.call_id,
                kind=RESULT,
                code=code.value[0],
                details=details,
                payload=payload,
                md_keys=keys,
                md_values=values,
                initial_md_keys=ikeys,
                initial_md_values=ivalues,
            )
        except Exception as e:
            # Status or metadata the servicer set that grpc would refuse too: the call still
            # gets its answer, as over plain gRPC (a missing one would hold its slot forever).
            code, details = _unexpected(frame, e)
            result = pb.MuxFrame(
                call_id=frame.call_id, kind=RESULT, code=code.value[0], details=details
            )
        await done(result)
        if self.on_call is not None:
            try:
                self.on_call(frame.method, ctx, code, time.perf_counter() - t0)
            except Exception:
                log.exception("mux call hook failed")

    async def _invoke(
        self, frame: pb.MuxFrame, ctx: MuxContext
    ) -> tuple[grpc.StatusCode, str, bytes]:
        handler = self.handlers.get(frame.method)
        if handler is None:
            return grpc.StatusCode.UNIMPLEMENTED, "Method not found!", b""
        try:
            request = handler.request_deserializer(frame.payload)
        except Exception as e:
            return grpc.StatusCode.INTERNAL, f"Exception deserializing request: {e}", b""
        try:
            result = handler.unary_unary(request, ctx)
            if inspect.isawaitable(result):
                if ctx._deadline is not None:
                    result = await asyncio.wait_for(result, ctx.time_remaining())
                else:
                    result = await result
        except MuxAbort:
            return _status(ctx._code), ctx._details, b""
        except TimeoutError as e:
            if ctx._deadline is not None and time.monotonic() >= ctx._deadline:
                return grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", b""
            # The method's own TimeoutError (a backend's, say): as any other exception.
            return (*_unexpected(frame, e), b"")
        except asyncio.CancelledError:
            # Cancelled by the gateway (then nobody reads this), or the method's own await
            # was cancelled: grpc answers that with CANCELLED too.
            return grpc.StatusCode.CANCELLED, "Cancelled", b""
        except multiplex.MultiplexedModelError as e:
            return e.code, e.details, b""
        except Exception as e:
            code, details = _unexpected(frame, e)
            if ctx._code is not None and ctx._code is not grpc.StatusCode.OK:
                code = _status(ctx._code)  # grpc keeps a code the method set before it raised
            return code, details, b""
        if ctx._code is not None and ctx._code is not grpc.StatusCode.OK:
            code = _status(ctx._code)
            if code is not grpc.StatusCode.OK:
                return code, ctx._details, b""
        if result is None:
            return grpc.StatusCode.INTERNAL, "servicer returned no response", b""
        try:
            payload = handler.response_serializer(result)
        except Exception as e:  # the method returned something else than its response type
            return (*_unexpected(frame, e), b"")
        if len(payload) > self.max_message_bytes:
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({len(payload)} vs. {self.max_message_bytes})",
                b"",
            )
        return grpc.StatusCode.OK, ctx._details, payload
