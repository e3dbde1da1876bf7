"""Plain (sync) response-streaming servicer methods, run for a `grpc.aio` server.

grpc.aio iterates a sync generator on an executor thread, but its sync `abort()` sends the
status from the event loop while the previous message may still be in flight, and the client
then often sees DEADLINE_EXCEEDED instead of the code. Here the generator runs on one executor
thread as there, one message at a time on demand, `abort()` raises (as in grpc's sync stack) so
the method stops there, and the status is sent after the messages before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

_END = object()


class _Abort(Exception):
    """Raised by `abort()` on the method's thread; the status goes out from the loop."""


class SyncStreamContext:
    """What a plain streaming method sees on its thread: grpc's sync servicer context."""

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self.aborted: tuple[Any, str, tuple[Any, ...]] | None = None

    def abort(self, code: grpc.StatusCode, details: str = "",
              trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details, tuple(trailing_metadata or ()))
        raise _Abort(details)

    def abort_with_status(self, status: Any) -> None:
        self.abort(status.code, status.details, status.trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        asyncio.run_coroutine_threadsafe(
            self._context.send_initial_metadata(initial_metadata), self._loop).result()

    def is_active(self) -> bool:
        return not (self._context.cancelled() or self._context.done())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._context.add_done_callback(lambda _ctx: callback())
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _SyncRequests(Iterator[Any]):
    """The request stream as a plain iterator, read on the method's thread."""

    def __init__(self, requests: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._requests = requests.__aiter__()
        self._loop = loop

    async def _next(self) -> Any:
        return await self._requests.__anext__()

    def __next__(self) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
        except StopAsyncIteration:
            raise StopIteration from None


def _settle(fut: asyncio.Future[Any], item: Any, exc: BaseException | None) -> None:
    if fut.done():  # the call was cancelled meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(item)


def _produce(method: Callable[..., Any], request: Any, ctx: SyncStreamContext,
             asks: queue.SimpleQueue[asyncio.Future[Any] | None],
             loop: asyncio.AbstractEventLoop) -> None:
    """On the executor thread: one message per ask; None as the ask means stop."""
    messages: Any = None
    fut = asks.get()
    try:
        while fut is not None:
            item, exc = _END, None
            try:
                if messages is None:
                    messages = iter(method(request, ctx))
                item = next(messages)
            except StopIteration:
                pass
            except BaseException as e:  # the method's own error, handed to the call
                exc = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, item, exc)
            if item is _END:
                return
            fut = asks.get()
    finally:
        close = getattr(messages, "close", None)
        if close is not None:  # stopped early: the generator's finally runs on its thread
            with contextlib.suppress(Exception):
                close()


async def sync_stream(method: Callable[..., Any], request: Any,
                      context: Any) -> AsyncIterator[Any]:
    """The messages of plain `method(request, context)`, for an async grpc.aio handler.

    `request` is the request, or the async request stream of a bidi call (handed to the
    method as a plain iterator, as grpc does).
    """
    loop = asyncio.get_running_loop()
    if hasattr(request, "__aiter__"):
        request = _SyncRequests(request, loop)
    ctx = SyncStreamContext(context, loop)
    asks: queue.SimpleQueue[asyncio.Future[Any] | None] = queue.SimpleQueue()
    run = contextvars.copy_context().run  # the call's log context goes with the method
    loop.run_in_executor(None, run, _produce, method, request, ctx, asks, loop)
    try:
        while True:
            fut: asyncio.Future[Any] = loop.create_future()
            asks.put(fut)
            try:
                item = await fut
            except _Abort:
                assert ctx.aborted is not None
                await context.abort(*ctx.aborted)  # raises grpc's own abort error
                raise
            if item is _END:
                return
            yield item
    finally:
        asks.put(None)  # the thread stops at its next ask
