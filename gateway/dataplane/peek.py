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
nothing held back longer than `PEEK_S` in all. A method whose calls prove to be streams is
not peeked at again (`Rest`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

PEEK_S = 0.05
"""How long the two reads may wait, together: no message is held back longer. A unary
client's message and end of stream are in by the time the handler runs, but a loaded event
loop may take several ms to see them (3 ms lost most single-message calls at 16 concurrent
calls); a method whose calls prove to be streams is not peeked at again (see `Rest`), so
a bidi method pays this once."""
MAX_STREAMING = 1024
"""Unknown methods remembered as streaming (bounded: clients choose the paths)."""


class StreamingMethods:
    """Unknown methods, per application, whose calls proved to be streams (and that a replica
    answered: paths a client makes up do not fill it): their calls skip the peek."""

    def __init__(self) -> None:
        self.paths: set[tuple[str, str]] = set()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.paths

    def add(self, key: tuple[str, str]) -> None:
        if len(self.paths) < MAX_STREAMING:
            self.paths.add(key)


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


async def peek_single(requests: AsyncIterator[bytes]) -> tuple[bytes | None, Rest | None]:
    """(the message, None) when the client sent one message and closed; else (None, the
    stream of everything the client sends, in order, which says whether the call proved to
    be a stream)."""
    it = requests.__aiter__()
    until = asyncio.get_running_loop().time() + PEEK_S
    first = _read(it)
    if not await _ready(first, until):
        return None, Rest([first], it)
    if first.exception() is not None:  # no message at all (or a failed read): as it is
        return None, Rest([first], it)
    second = _read(it)
    if await _ready(second, until) and isinstance(second.exception(), StopAsyncIteration):
        return first.result(), None
    return None, Rest([first, second], it)


class Rest:
    """The client's messages after a peek that found no single message: the reads already
    started, in order, then the rest of the stream.

    Only proof marks the method streaming: a second message, none at all, or an answer from
    the replica before the client's end (a unary replica answers one whole request, sent with
    its end). A peek that ran out of time proves nothing: on a loaded loop a unary client's
    message and end can take longer than PEEK_S to be read, and that must not send every
    later call of the method the expensive way."""

    __slots__ = ("_it", "_pending", "ended", "n", "proved", "replied")

    def __init__(self, pending: list[asyncio.Future[bytes]], it: AsyncIterator[bytes]) -> None:
        self._pending = pending
        self._it = it
        self.n = 0
        """Messages passed on so far."""
        self.ended = False
        """The client's end of stream was passed on."""
        self.proved = False
        """The call is a stream (see the class docstring)."""
        self.replied = False
        """The replica sent a message."""

    def answered(self) -> None:
        """The replica's first message arrived."""
        self.replied = True
        if not self.ended:
            self.proved = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[bytes]:
        pending = self._pending
        try:
            for t in pending:
                try:
                    msg = await t
                except StopAsyncIteration:
                    self._end()
                    return
                yield self._count(msg)
            async for msg in self._it:
                yield self._count(msg)
            self._end()
        finally:
            for t in pending:
                if not t.done():
                    t.cancel()

    def _count(self, msg: bytes) -> bytes:
        self.n += 1
        if self.n == 2:
            self.proved = True
        return msg

    def _end(self) -> None:
        self.ended = True
        if self.n == 0:  # a unary client always sends its message
            self.proved = True
