"""Pre-encoded gRPC request bodies for h2load (`-d FILE`): one length-prefixed message each.

gRPC over HTTP/2 carries a message as a 5-byte prefix (compressed flag, 4-byte big-endian
length) followed by the serialized protobuf; h2load sends the file verbatim as the body.
"""

from __future__ import annotations

import struct
from pathlib import Path

from gateway.pb import bench_pb2

PAYLOAD_BYTES = 32
"""Size of the echoed payload: small, so the benchmark measures per-call cost, not copying."""


def grpc_frame(message: bytes) -> bytes:
    """`message` as one uncompressed gRPC length-prefixed message."""
    return struct.pack(">BI", 0, len(message)) + message


def echo_request(payload_bytes: int = PAYLOAD_BYTES) -> bytes:
    """The serialized `bench.EchoMessage` every benchmark call sends (and gets back)."""
    return bench_pb2.EchoMessage(payload=b"x" * payload_bytes).SerializeToString()


def write_echo_frame(path: Path, payload_bytes: int = PAYLOAD_BYTES) -> tuple[Path, bytes]:
    """Write the request body file for h2load; returns it and the serialized message."""
    msg = echo_request(payload_bytes)
    path.write_bytes(grpc_frame(msg))
    return path, msg
