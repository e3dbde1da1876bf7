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
not peeked at again for a while (`Rest`, `REMEMBER_S`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

PEEK_S = 0.05
"""How long the two reads may wait, together: no message is held back longer. A unary
client's message and end of stream are in by the time the handler runs, but a loaded event
loop may take several ms to see them (3 ms lost most single-message calls at 16 concurrent
calls); a method whose calls prove to be streams is not peeked at again (see `Rest`), so
a bidi method pays this once."""
MAX_STREAMING = 1024
"""Unknown methods remembered as streaming, per application (bounded: clients choose the
paths, and one application's clients cannot crowd out another's methods)."""
REMEMBER_S = 60.0
"""How long a method stays remembered as streaming after the last call that proved it: a
unary method marked by a malformed or slow-closing client goes back to the cheap way, while a
bidi method's own calls keep it remembered."""


class StreamingMethods:
    """Unknown methods, per application, whose calls proved lately to be streams and that a
    replica answered (paths a client makes up do not fill it): their calls skip the peek."""

    def __init__(self) -> None:
        self._apps: dict[str, dict[str, float]] = {}
        """application -> path -> until (monotonic)."""
        self._purge_at: dict[str, float] = {}
        """For a full application: when its next entry expires (no scan before then)."""

    def __contains__(self, key: tuple[str, str]) -> bool:
        paths = self._apps.get(key[0])
        if paths is None:
            return False
        until = paths.get(key[1])
        if until is None:
            return False
        if until < time.monotonic():
            del paths[key[1]]
            return False
        return True

    @property
    def paths(self) -> set[tuple[str, str]]:
        """The (application, path) pairs remembered now."""
        now = time.monotonic()
        return {(app, path) for app, paths in self._apps.items()
                for path, until in paths.items() if until >= now}

    def add(self, key: tuple[str, str]) -> None:
        app, path = key
        now = time.monotonic()
        paths = self._apps.setdefault(app, {})
        if path not in paths and len(paths) >= MAX_STREAMING:
            if now < self._purge_at.get(app, 0.0):
                return  # full, and nothing has expired yet
            for p in [p for p, until in paths.items() if until < now]:
                del paths[p]
            if len(paths) >= MAX_STREAMING:
                self._purge_at[app] = min(paths.values())
                return
        paths[path] = now + REMEMBER_S


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


async def peek_single(requests: AsyncIterator[bytes], key: tuple[str, str],
                      streaming: StreamingMethods) -> tuple[bytes | None, Rest | None]:
    """(the message, None) when the client sent one message and closed; else (None, the
    stream of everything the client sends, in order, which remembers `key` in `streaming`
    once the call proves to be a stream)."""
    it = requests.__aiter__()
    until = asyncio.get_running_loop().time() + PEEK_S
    first = _read(it)
    if not await _ready(first, until):
        return None, Rest([first], it, key, streaming)
    if first.exception() is not None:  # no message at all (or a failed read): as it is
        return None, Rest([first], it, key, streaming)
    second = _read(it)
    if await _ready(second, until) and isinstance(second.exception(), StopAsyncIteration):
        return first.result(), None
    return None, Rest([first, second], it, key, streaming)


class Rest:
    """The client's messages, in order (after a peek: the reads already started, then the
    rest of the stream), watched for proof that the method streams.

    Proof: a second message, or none at all (a unary client always sends one), or an answer
    from the replica before the client's end. The last is not certain: a unary replica
    answers as soon as it has the message, so a client slow to close looks like a bidi client
    that sends one request and reads the answers (the style of token streaming). Taking it as
    proof spares that bidi style the peek's wait on every call; a unary method it marks goes
    back after REMEMBER_S. A peek that ran out of time proves nothing (a large message, a
    loaded loop: the message and its end are passed on before any answer can come back). The
    method is remembered once the replica has answered too."""

    __slots__ = ("_it", "_key", "_pending", "_streaming", "ended", "n", "proved", "replied")

    def __init__(self, pending: list[asyncio.Future[bytes]], it: AsyncIterator[bytes],
                 key: tuple[str, str], streaming: StreamingMethods) -> None:
        self._pending = pending
        self._it = it
        self._key = key
        self._streaming = streaming
        self.n = 0
        """Messages passed on so far."""
        self.ended = False
        """The client's end of stream was passed on."""
        self.proved = False
        self.replied = False
        """The replica sent a message."""

    def answered(self) -> None:
        """The replica's first message arrived."""
        self.replied = True
        if not self.ended:
            self.proved = True
        if self.proved:
            self._streaming.add(self._key)

    def _proof(self) -> None:
        self.proved = True
        if self.replied:
            self._streaming.add(self._key)

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
            self._proof()
        return msg

    def _end(self) -> None:
        self.ended = True
        if self.n == 0:  # a unary client always sends its message
            self._proof()
