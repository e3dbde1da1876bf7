"""Open Inference Protocol (KServe v2) tensors for model authors and the HTTP ingress.

`infer_response` builds a `ModelInferResponse` in the form the request used: raw
(`raw_output_contents`) when the request's inputs came raw, typed `contents` otherwise. That is
what Triton and MLServer do, and Triton's clients (`tritonclient`) read outputs only from
`raw_output_contents`: a model answering typed contents to them gives `as_numpy` nothing.

    from gateway.oip import Tensor, infer_response

    async def ModelInfer(self, request, context):
        ...
        return infer_response(request, [Tensor("label", "BYTES", [n], labels),
                                        Tensor("score", "FP32", [n], scores)],
                              model_name="iris", model_version="1")
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.pb import grpc_predict_v2_pb2 as pb

TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
"""The typed `InferTensorContents` field of each datatype (FP16 and BF16 travel raw only)."""
RAW_FORMAT = {
    "BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B",
    "UINT16": "H", "UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d",
    "BF16": "H",
}
"""struct format of one element of each fixed-size datatype (little-endian on the wire)."""


@dataclass(frozen=True, slots=True)
class Tensor:
    """One output tensor: flat values in row-major order (BYTES values as bytes or str)."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: Sequence[Any]
    parameters: dict[str, Any] | None = None


def element_count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def encode_raw(datatype: str, values: Sequence[Any]) -> bytes:
    """Values as the protocol's raw little-endian bytes (BYTES: 4-byte length, then the bytes)."""
    if datatype == "BYTES":
        parts = []
        for v in values:
            b = _as_bytes(v)
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    fmt = RAW_FORMAT.get(datatype)
    if fmt is None:
        raise ValueError(f"unknown datatype {datatype!r}")
    if datatype == "BF16":
        # The upper half of the FP32 bits (truncated, as torch does for a cast).
        return b"".join(struct.pack("<f", float(v))[2:] for v in values)
    return struct.pack(f"<{len(values)}{fmt}", *values)


def set_typed(contents: pb.InferTensorContents, datatype: str, values: Sequence[Any]) -> None:
    """Fill typed contents; FP16/BF16 have no typed field (send them raw)."""
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise ValueError(f"datatype {datatype!r} has no typed contents: send it raw")
    if datatype == "BYTES":
        values = [_as_bytes(v) for v in values]
    getattr(contents, field).extend(values)


def wants_raw(request: pb.ModelInferRequest) -> bool:
    """True when the request's inputs came raw: then the answer goes raw too."""
    return len(request.raw_input_contents) > 0


def _set_params(target: Any, params: dict[str, Any] | None) -> None:
    for key, value in (params or {}).items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def infer_response(
    request: pb.ModelInferRequest,
    outputs: Sequence[Tensor],
    *,
    model_name: str = "",
    model_version: str = "",
    raw: bool | None = None,
) -> pb.ModelInferResponse:
    """A `ModelInferResponse` in the form of `request`: raw outputs when its inputs were raw.

    Only the outputs the request names in `outputs` are returned when it names any (as Triton
    does); `raw` forces a form. The response carries the request's `id`.
    """
    if raw is None:
        raw = wants_raw(request)
    wanted = {o.name for o in request.outputs}
    resp = pb.ModelInferResponse(
        model_name=model_name or request.model_name,
        model_version=model_version or request.model_version,
        id=request.id,
    )
    for t in outputs:
        if wanted and t.name not in wanted:
            continue
        n = element_count(t.shape)
        if n != len(t.data):
            raise ValueError(f"output {t.name!r}: {len(t.data)} values for shape {list(t.shape)}")
        out = resp.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        _set_params(out.parameters, t.parameters)
        if raw or t.datatype not in TYPED_FIELD:
            resp.raw_output_contents.append(encode_raw(t.datatype, t.data))
        else:
            set_typed(out.contents, t.datatype, t.data)
    if raw is False and resp.raw_output_contents and len(resp.raw_output_contents) != len(
        resp.outputs
    ):
        # The protocol allows raw for all outputs or none: FP16/BF16 force the whole answer raw.
        return infer_response(request, outputs, model_name=model_name,
                              model_version=model_version, raw=True)
    return resp
