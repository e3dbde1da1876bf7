"""`multiplexed_model_id_from: oip_model_name`: an Open Inference Protocol call's model id is
its request's `model_name`, so unmodified Triton and KServe clients get per-model routing.

Only that one field is read, by walking the top-level fields of the request bytes (skipping
each by its length, never decoding the tensors): no protobuf decoding on the call path.
"""

from __future__ import annotations

from typing import Any

import grpc

from gateway.dataplane import errors
from gateway.dataplane.model_affinity import MAX_MODEL_ID_LEN

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_FIELDS = 64
"""A ModelInferRequest has 7 top-level fields (repeated ones once per item): more means a very
large batch of inputs, and model_name normally comes first anyway."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]  # IndexError on truncated input: the caller gives up
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def oip_model_name(request: bytes) -> str | None:
    """Field 1 (`model_name`) of a serialized `inference.ModelInferRequest`, or None. When the
    field is there more than once, the last one (as protobuf, and so the replica, reads it)."""
    i, n = 0, len(request)
    found: str | None = None
    try:
        for _ in range(MAX_FIELDS):
            if i >= n:
                return found
            tag, i = _varint(request, i)
            field, wire = tag >> 3, tag & 7
            if wire == 2:
                size, i = _varint(request, i)
                if field == 1:
                    if size == 0 or size > MAX_MODEL_ID_LEN or i + size > n:
                        return None
                    found = request[i:i + size].decode("utf-8")
                i += size
            elif wire == 0:
                _, i = _varint(request, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return None  # groups: not in this message
            if i > n:
                return None  # a field running past the end: the replica answers it
    except (IndexError, ValueError):  # truncated or not UTF-8: the replica answers it
        return None
    return found  # a very large batch of inputs: the last model_name seen so far


def model_id_from_oip(path: str, request: Any) -> str | None:
    """The hook an application route calls for its unary calls without the metadata key.

    The id is forwarded to the replica as the `multiplexed_model_id` metadata, which gRPC
    carries as ASCII only: a model_name with other characters is refused (INVALID_ARGUMENT)."""
    if path != MODEL_INFER or not isinstance(request, bytes):
        return None
    name = oip_model_name(request)
    if name is not None and not (name.isascii() and name.isprintable()):
        raise errors.GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "model_name must be printable ASCII to route by it (it is forwarded as the "
            "'multiplexed_model_id' metadata); set that metadata key instead, or rename the "
            "model",
        )
    return name
