"""Keeping the messages of a sampled streaming call (client-, server-streaming and bidi) for its
prediction record, bounded in memory.

The proxy asks the application's route for a capture when a streaming call starts
(`route.stream_capture(path)`: None when the call is not sampled), passes each request and
response message through it, and hands it the finished call (`done`). A capture keeps at most
`max_bytes` per direction and `MAX_MESSAGES` messages, and all captures together at most
`STREAM_BUDGET_BYTES`; past any of these it lets the messages go, and the call still becomes a
record, without its payload and tagged `payload_dropped`. Everything runs on the event loop:
an append per message, nothing decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.dataplane.call import CallRecord

MAX_MESSAGES = 10_000
"""Messages kept per direction of one call."""
STREAM_BUDGET_BYTES = 64 << 20
"""Bytes kept by all streaming calls in flight together."""

STREAM_DROP_REASONS = ("too_many_messages", "capture_budget")
"""Why a stream's messages were let go, besides `payload_too_large` (counted by the pipeline)."""

Sink = Callable[["CallRecord", "tuple[list[bytes], list[bytes]] | None", "str | None", str],
                None]


class Budget:
    """Bytes held by the captures in flight (event loop only: no lock)."""

    __slots__ = ("left",)

    def __init__(self, total: int = STREAM_BUDGET_BYTES) -> None:
        self.left = total


class StreamCapture:
    """The messages of one sampled streaming call."""

    __slots__ = ("_budget", "_held", "_max", "_sink", "note", "reason", "requests", "responses",
                 "sizes")

    def __init__(self, sink: Sink, max_bytes: int, budget: Budget) -> None:
        self._sink = sink
        self._max = max_bytes
        self._budget = budget
        self._held = 0
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        self.sizes = [0, 0]
        self.note: str | None = None
        """Why the messages were let go (then the record has no payload)."""
        self.reason = ""
        """The drop reason counted for it: payload_too_large or one of STREAM_DROP_REASONS."""

    def _keep(self, into: list[bytes], side: int, msg: bytes) -> None:
        if self.note is not None:
            return
        size = len(msg)
        self.sizes[side] += size
        why = None
        if self.sizes[side] > self._max:
            why = f"{('request', 'response')[side]} larger than max_payload_bytes"
            self.reason = "payload_too_large"
        elif len(into) >= MAX_MESSAGES:
            why = f"more than {MAX_MESSAGES} {('request', 'response')[side]} messages"
            self.reason = "too_many_messages"
        elif size > self._budget.left:
            why = "streaming capture budget exhausted"
            self.reason = "capture_budget"
        if why is not None:
            self._let_go(why)
            return
        self._budget.left -= size
        self._held += size
        into.append(msg)

    def _let_go(self, why: str) -> None:
        self.note = why
        self.requests = []
        self.responses = []
        self._budget.left += self._held
        self._held = 0

    def requests_of(self, request: Any) -> Any:
        """The call's request (bytes, or the client's message stream) passed on as it is."""
        if isinstance(request, bytes | bytearray):
            self._keep(self.requests, 0, bytes(request))
            return request
        return self._stream(request)

    async def _stream(self, it: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for msg in it:
            self._keep(self.requests, 0, msg)
            yield msg

    def response(self, msg: bytes | None) -> None:
        if msg is not None:
            self._keep(self.responses, 1, msg)

    def done(self, rec: CallRecord, response: bytes | None = None) -> None:
        """The call ended: hand its messages to the record pipeline (once)."""
        self.response(response)
        stream = None if self.note is not None else (self.requests, self.responses)
        self._budget.left += self._held
        self._held = 0
        sink, self._sink = self._sink, _ignore
        sink(rec, stream, self.note, self.reason)


def _ignore(rec: CallRecord, stream: tuple[list[bytes], list[bytes]] | None,
            note: str | None, reason: str) -> None:
    pass
