"""Mux framing: every stream message fits max_message_bytes; pieces join back exactly."""

from __future__ import annotations

import random

import pytest

from gateway.dataplane.mux_frames import CALL, RESULT, FrameTooLarge, Reassembler, batches, split
from gateway.pb import replica_control_pb2 as pb

LIMIT = 4096


def frame(call_id: int, size: int, kind: int = CALL, md: int = 1) -> pb.MuxFrame:
    return pb.MuxFrame(call_id=call_id, kind=kind, method="/a.B/C",
                       payload=bytes([call_id % 251]) * size,
                       md_keys=[f"k{i}" for i in range(md)], md_values=[b"v" * 20] * md,
                       timeout_s=1.5, code=0)


@pytest.mark.parametrize("kind", [CALL, RESULT])
def test_batches_fit_and_pieces_join(kind: int) -> None:
    rng = random.Random(7)
    sizes = [rng.choice([0, 10, LIMIT // 3, LIMIT - 60, LIMIT, 3 * LIMIT + 5]) for _ in range(200)]
    originals = [frame(i + 1, n, kind) for i, n in enumerate(sizes)]
    expected = {f.call_id: f.SerializeToString() for f in originals}
    copies = [pb.MuxFrame.FromString(f.SerializeToString()) for f in originals]
    parts = Reassembler()
    joined = {}
    for batch in batches(copies, LIMIT, lambda f: None):
        wire = pb.MuxBatch(frames=batch).SerializeToString()
        assert len(wire) <= LIMIT
        for piece in pb.MuxBatch.FromString(wire).frames:
            whole = parts.feed(piece)
            if whole is not None:
                joined[whole.call_id] = whole.SerializeToString()
    assert not parts
    assert joined == expected


def test_a_frame_whose_header_cannot_fit_is_refused_alone() -> None:
    huge_md = frame(2, 10, md=400)  # ~12 kB of metadata, over the 4 kB limit
    with pytest.raises(FrameTooLarge):
        split(pb.MuxFrame.FromString(huge_md.SerializeToString()), LIMIT)
    refused: list[int] = []
    out = list(batches([frame(1, 10), huge_md, frame(3, 10)], LIMIT,
                       lambda f: refused.append(f.call_id)))
    assert refused == [2]
    assert [f.call_id for b in out for f in b] == [1, 3]
