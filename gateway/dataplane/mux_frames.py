"""Framing of the mux stream, shared by both ends: batches that fit `max_message_bytes`.

Frames ready together travel in one `MuxBatch` stream message, but one stream message may not
exceed `max_message_bytes` (grpc would end the whole stream, failing every call on it). So a
batch holds frames while they fit, and a frame too big for one message on its own (a payload
close to the limit plus its framing) travels in pieces (`more` set on all but the last), which
the other end joins again. A frame whose non-payload part alone cannot fit is refused, failing
only its own call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gateway.pb import replica_control_pb2 as pb

CALL, CANCEL, RESULT = pb.MuxFrame.CALL, pb.MuxFrame.CANCEL, pb.MuxFrame.RESULT
MAX_BATCH_FRAMES = 256

# Bytes a frame costs in a batch beyond its own size: field tag and length varint (<= 1 + 5).
_IN_BATCH = 6
# What a piece adds to the frame it is cut from: payload tag and length, the `more` flag.
_PIECE = 16


def to_lists(metadata: Any) -> tuple[list[str], list[bytes]]:
    keys: list[str] = []
    values: list[bytes] = []
    for k, v in metadata or ():
        keys.append(k)
        values.append(v if isinstance(v, bytes) else str(v).encode())
    return keys, values


def from_lists(keys: Any, values: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(
        (k, v if k.endswith("-bin") else v.decode("utf-8", "replace"))
        for k, v in zip(keys, values, strict=False)
    )


class FrameTooLarge(Exception):
    """A frame's method, metadata and status alone exceed one stream message."""


def split(frame: pb.MuxFrame, limit: int) -> list[pb.MuxFrame]:
    """`frame`, or its pieces when it does not fit one stream message of `limit` bytes."""
    if frame.ByteSize() + _IN_BATCH <= limit:
        return [frame]
    payload = frame.payload
    frame.payload = b""
    room = limit - frame.ByteSize() - _IN_BATCH - _PIECE
    if room <= 0:
        raise FrameTooLarge()
    pieces = [frame]
    frame.payload = payload[:room]
    frame.more = True
    # A continuation carries only its call id, kind and the next part of the payload.
    room = limit - _IN_BATCH - _PIECE - 16
    if room <= 0:
        raise FrameTooLarge()
    for start in range(len(frame.payload), len(payload), room):
        pieces.append(
            pb.MuxFrame(
                call_id=frame.call_id, kind=frame.kind, payload=payload[start:start + room],
                more=True,
            )
        )
    pieces[-1].more = False
    return pieces


def batches(
    frames: Iterable[pb.MuxFrame],
    limit: int,
    refused: Callable[[pb.MuxFrame], pb.MuxFrame | None],
) -> Iterator[list[pb.MuxFrame]]:
    """Group `frames` into batches of at most `limit` bytes serialized (and MAX_BATCH_FRAMES).

    Lazy, so a caller can drop frames of calls cancelled while earlier batches were written.
    `refused(frame)` answers for a frame that cannot fit at all: a replacement, or None.
    """
    batch: list[pb.MuxFrame] = []
    size = 0
    for frame in frames:
        try:
            pieces = split(frame, limit)
        except FrameTooLarge:
            replacement = refused(frame)
            if replacement is None:
                continue
            pieces = [replacement]
        for piece in pieces:
            n = piece.ByteSize() + _IN_BATCH
            if batch and (size + n > limit or len(batch) >= MAX_BATCH_FRAMES):
                yield batch
                batch, size = [], 0
            batch.append(piece)
            size += n
    if batch:
        yield batch


class Reassembler:
    """Joins the pieces of frames that travelled split (see `split`), per call id."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: dict[int, tuple[pb.MuxFrame, list[bytes]]] = {}

    def feed(self, frame: pb.MuxFrame) -> pb.MuxFrame | None:
        """The whole frame once its last piece is in; None while pieces are missing."""
        entry = self._parts.get(frame.call_id)
        if entry is None:
            if frame.more:
                self._parts[frame.call_id] = (frame, [frame.payload])
                return None
            return frame
        entry[1].append(frame.payload)
        if frame.more:
            return None
        del self._parts[frame.call_id]
        head = entry[0]
        head.payload = b"".join(entry[1])
        head.more = False
        return head

    def drop(self, call_id: int) -> None:
        self._parts.pop(call_id, None)

    def __bool__(self) -> bool:
        return bool(self._parts)
