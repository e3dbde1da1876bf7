"""The context a servicer method gets for a call that came over the mux: it behaves as
`grpc.aio`'s ServicerContext (abort, metadata, deadline, done callbacks), and as the sync one
for plain methods run on an executor thread."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger("gateway.mux")


class MuxAbort(Exception):
    """Raised by `abort()` to end the servicer method; the server answers the set status."""


class MuxContext:
    """The `ServicerContext` a servicer method sees for a call that came over the mux."""

    def __init__(
        self, metadata: tuple[tuple[str, Any], ...], deadline: float | None, peer: str
    ) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, Any], ...] = ()
        self._initial: tuple[tuple[str, Any], ...] = ()
        self._callbacks: list[Callable[[Any], None]] = []
        self._done = False
        self.cancelled_flag = False
        """Set when the gateway cancelled the call (client cancel or deadline)."""

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def _set_abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("abort() with StatusCode.OK")  # as grpc.aio does
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self._set_abort(code, details, trailing_metadata)
        raise MuxAbort()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        if not isinstance(details, str):  # refused here, as grpc does
            raise TypeError(f"Argument 'details' has incorrect type (expected str, got "
                            f"{type(details).__name__})")
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        """Travels with the result; the gateway sends it to its client as initial metadata."""
        self._initial = tuple(initial_metadata)

    async def read(self) -> Any:
        raise RuntimeError("read() is not available on a unary call")

    async def write(self, message: Any) -> None:
        raise RuntimeError("write() is not available on a unary call")

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, Any]:
        return {}

    def set_compression(self, compression: Any) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def cancelled(self) -> bool:
        return self.cancelled_flag

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._done:
            with contextlib.suppress(Exception):
                callback(self)
            return
        self._callbacks.append(callback)

    def _finish(self) -> None:
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("done callback failed")


class SyncMuxContext:
    """What a plain (sync) servicer method sees, on an executor thread: grpc's sync context.

    As with grpc, `abort()` raises so the method stops there; everything else is the call's
    `MuxContext`.
    """

    def __init__(self, ctx: MuxContext) -> None:
        self._ctx = ctx

    def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self._ctx._set_abort(code, details, trailing_metadata)
        raise MuxAbort()

    def abort_with_status(self, status: Any) -> None:
        self.abort(status.code, status.details, status.trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._ctx._initial = tuple(initial_metadata)

    def is_active(self) -> bool:
        return not (self._ctx.cancelled_flag or self._ctx._done)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._ctx.add_done_callback(lambda _ctx: callback())
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)
