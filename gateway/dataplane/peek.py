"""A call of unknown shape that is one request message: forwarded as a unary-request call.

The gateway must take a method it does not know as a bidi stream (any of the four shapes
looks like one on the wire). But upstream, a bidi call costs grpc.aio a separate batch for
the message, the half-close and the status, each with its own write and wake-up, on both
sides (measured: ~0.72x the calls/s of the same method forwarded as known, and ~15% more
replica CPU per call). Most unknown calls are unary: the client sends one message and
closes at once. So the proxy looks at the start of the request stream for a moment: one
message, then its end, and the call goes upstream as unary-stream (one batch: headers,
message, half-close), which the replica cannot tell from what the client sent. Anything else
(more messages, or nothing within `PEEK_S`, as with a bidi client that waits for the server
to speak first) goes upstream as a stream with every message, in order: nothing is lost, and
nothing held back longer than `PEEK_S` in all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

PEEK_S = 0.05
"""How long the two reads may wait, together: no message is held back longer. A unary
client's message and end of stream are in by the time the handler runs, but a loaded event
loop may take several ms to see them (3 ms lost most single-message calls at 16 concurrent
calls); a method whose calls turn out to be streams is not peeked at again (see
`StreamingMethods`), so a bidi method pays this once."""
MAX_STREAMING = 1024
"""Unknown methods remembered as streaming (bounded: clients choose the paths)."""


class StreamingMethods:
    """Unknown methods whose calls were seen to be streams: their calls skip the peek."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def add(self, path: str) -> None:
        if len(self.paths) < MAX_STREAMING:
            self.paths.add(path)


def _settle(t: asyncio.Future[Any]) -> None:
    # A read left pending when the call ends completes (or fails) with the call: its outcome
    # is taken here so asyncio does not log "exception was never retrieved".
    if not t.cancelled():
        t.exception()


def _read(it: AsyncIterator[bytes]) -> asyncio.Future[bytes]:
    t = asyncio.ensure_future(it.__anext__())
    t.add_done_callback(_settle)
    return t


async def _ready(t: asyncio.Future[bytes], until: float) -> bool:
    """True once `t` has finished, waiting until `until` at most (it is not cancelled)."""
    if not t.done():
        left = until - asyncio.get_running_loop().time()
        if left <= 0:
            return False
        try:
            await asyncio.wait((t,), timeout=left)
        except BaseException:
            t.cancel()  # this call is being cancelled: its pending read goes with it
            raise
    return t.done()


async def peek_single(requests: AsyncIterator[bytes]) -> tuple[bytes | None,
                                                               AsyncIterator[bytes], bool]:
    """(the message, an empty stream, False) when the client sent one message and closed;
    else (None, a stream of everything the client sends, in order, and whether the call was
    seen to be a stream: no message, no end within PEEK_S, or a second message)."""
    it = requests.__aiter__()
    until = asyncio.get_running_loop().time() + PEEK_S
    first = _read(it)
    if not await _ready(first, until):
        return None, _chain([first], it), True
    if first.exception() is not None:  # no message at all (or a failed read): as it is
        return None, _chain([first], it), isinstance(first.exception(), StopAsyncIteration)
    second = _read(it)
    if await _ready(second, until) and isinstance(second.exception(), StopAsyncIteration):
        return first.result(), _chain([], None), False
    failed = second.done() and not isinstance(second.exception() or StopAsyncIteration(),
                                              StopAsyncIteration)
    return None, _chain([first, second], it), not failed


async def _chain(pending: list[asyncio.Future[bytes]],
                 rest: AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
    """The reads already started, in order, then the rest of the stream."""
    try:
        for t in pending:
            try:
                msg = await t
            except StopAsyncIteration:
                return
            yield msg
        if rest is not None:
            async for msg in rest:
                yield msg
    finally:
        for t in pending:
            if not t.done():
                t.cancel()
