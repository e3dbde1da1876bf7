"""Open Inference Protocol REST (KServe v2) bodies <-> the protocol's gRPC messages.

JSON tensors become typed `contents`; inputs sent in Triton's binary tensor extension
(`Inference-Header-Content-Length`, `binary_data_size`) become `raw_input_contents`, and then
every input goes raw (the protocol allows raw for all inputs or none). Answers are read from raw
or typed outputs alike; outputs asked for as binary (`binary_data`, `binary_data_output`) are
appended raw after the JSON header, as Triton's HTTP client expects.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from gateway.ingress.http.errors import RestError, parse_json
from gateway.oip import RAW_FORMAT, TYPED_FIELD, element_count, encode_raw, set_typed
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.records.tensors import DecodeProblem, tensor_values

_HTTP_ONLY_PARAMS = frozenset({"binary_data", "binary_data_size", "binary_data_output"})
_INTS = {f"{s}INT{b}": ((-(2 ** (b - 1)), 2 ** (b - 1) - 1) if s == "" else (0, 2**b - 1))
         for s in ("", "U") for b in (8, 16, 32, 64)}
"""Integer datatypes and their ranges."""


def _flatten(data: Any) -> list[Any]:
    """Nested lists flattened a level at a time (cheaper than a recursive generator)."""
    if not isinstance(data, list):
        return [data]
    flat = data
    for _ in range(64):
        if not any(type(x) is list for x in flat):
            return flat
        nxt: list[Any] = []
        for x in flat:
            if type(x) is list:
                nxt.extend(x)
            else:
                nxt.append(x)
        flat = nxt
    raise RestError(400, "'data' is nested too deeply")


def _text(value: str, where: str) -> str:
    """A JSON string that protobuf (UTF-8) can hold: no lone surrogates (`"\\ud800"`)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise RestError(400, f"{where}: not valid Unicode (a lone surrogate escape)") from None
    return value


def _set_params(target: Any, params: Any, where: str) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise RestError(400, f"{where}: 'parameters' must be an object")
    for key, value in params.items():
        if key in _HTTP_ONLY_PARAMS:
            continue
        p = target[_text(key, f"{where}: a parameter name")]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise RestError(400, f"{where}: parameter {key!r} is out of the int64 range")
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = _text(value, f"{where}: parameter {key!r}")
        else:
            raise RestError(400, f"{where}: parameter {key!r} must be a bool, number or string")


def params_json(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(p, kind)
    return out


def _check_value(name: str, datatype: str, v: Any) -> Any:
    ok: bool
    if datatype == "BOOL":
        ok = isinstance(v, bool)
    elif datatype in _INTS:
        lo, hi = _INTS[datatype]
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
    elif datatype == "BYTES":
        ok = isinstance(v, str)
    else:
        ok = isinstance(v, int | float) and not isinstance(v, bool)
    if not ok:
        raise RestError(400, f"input {name!r}: {json.dumps(v)[:40]} is not a {datatype} value")
    return _text(v, f"input {name!r}").encode() if datatype == "BYTES" else v


_NUMBER = (int, float)


def _check_values(name: str, datatype: str, flat: list[Any]) -> list[Any]:
    """The values checked for the datatype: one pass over the common all-good case, then the
    per-value check (for its message) only when something is off."""
    if datatype in _INTS:
        lo, hi = _INTS[datatype]
        if all(type(v) is int for v in flat) and (not flat or (lo <= min(flat)
                                                  and max(flat) <= hi)):
            return flat
    elif datatype == "BOOL":
        if all(type(v) is bool for v in flat):
            return flat
    elif datatype != "BYTES" and all(type(v) in _NUMBER for v in flat):
        return flat
    return [_check_value(name, datatype, v) for v in flat]


def _shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
    ):
        raise RestError(400, f"input {name!r}: 'shape' must be a list of non-negative integers "
                             "(int64)")
    return shape


def parse_infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, set[str] | None]:
    """The gRPC request for a REST infer body, and which outputs go back binary (None: all)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise RestError(400, f"Inference-Header-Content-Length {header_length[:20]!r} must "
                                 f"be an integer from 0 to the body's length ({len(body)})")
        body, binary = body[:n], body[n:]
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise RestError(400, "the infer request must be a JSON object")
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise RestError(400, "'id' must be a string")
        req.id = _text(rid, "'id'")
    top = doc.get("parameters")
    _set_params(req.parameters, top, "request")
    binary_out: set[str] | None = set()
    if isinstance(top, dict) and top.get("binary_data_output") is True:
        binary_out = None
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RestError(400, "'inputs' must be a non-empty list")
    values: list[list[Any] | bytes] = []
    pos = 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise RestError(400, f"inputs[{i}] must be an object")
        name, datatype = t.get("name"), t.get("datatype")
        if not isinstance(name, str) or not name:
            raise RestError(400, f"inputs[{i}]: 'name' must be a non-empty string")
        _text(name, f"inputs[{i}]: 'name'")
        if not isinstance(datatype, str) or (datatype not in RAW_FORMAT
                                             and datatype != "BYTES"):
            raise RestError(400, f"input {name!r}: unknown datatype {str(datatype)[:20]!r}")
        shape = _shape(name, t.get("shape"))
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        params = t.get("parameters")
        _set_params(tensor.parameters, params, f"input {name!r}")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RestError(400, f"input {name!r}: binary_data_size must be an integer")
            if pos + size > len(binary):
                raise RestError(400, f"input {name!r}: binary_data_size {size} runs past the "
                                     f"{len(binary)} bytes of binary data")
            values.append(binary[pos : pos + size])
            pos += size
            continue
        if "data" not in t:
            raise RestError(400, f"input {name!r}: 'data' is missing (or binary_data_size)")
        flat = _check_values(name, datatype, _flatten(t["data"]))
        if len(flat) != element_count(shape):
            raise RestError(400, f"input {name!r}: {len(flat)} values for shape {shape}")
        values.append(flat)
    if pos != len(binary):
        raise RestError(400, f"{len(binary) - pos} bytes of binary data are not claimed by any "
                             "input's binary_data_size")
    raw = any(isinstance(v, bytes) for v in values) or any(
        t.datatype not in TYPED_FIELD for t in req.inputs
    )
    for tensor, v in zip(req.inputs, values, strict=True):
        try:
            if raw:
                req.raw_input_contents.append(
                    v if isinstance(v, bytes) else encode_raw(tensor.datatype, v))
            else:
                assert not isinstance(v, bytes)
                set_typed(tensor.contents, tensor.datatype, v)
        except (struct.error, OverflowError, ValueError, TypeError) as e:
            raise RestError(400, f"input {tensor.name!r}: {e}") from None
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise RestError(400, "'outputs' must be a list")
        for i, o in enumerate(outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise RestError(400, f"outputs[{i}] must be an object with a 'name'")
            out = req.outputs.add(name=_text(o["name"], f"outputs[{i}]: 'name'"))
            p = o.get("parameters")
            _set_params(out.parameters, p, f"output {o['name']!r}")
            if isinstance(p, dict) and p.get("binary_data") is True and binary_out is not None:
                binary_out.add(o["name"])
    return req, binary_out


def infer_request_bytes(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[bytes, set[str] | None]:
    """`parse_infer_request`, serialized (all of it off the loop for a big body)."""
    req, binary_out = parse_infer_request(body, header_length, model, version)
    return req.SerializeToString(), binary_out


def infer_response_body(
    data: bytes, binary_out: set[str] | None
) -> tuple[bytes, dict[str, str]]:
    """A REST infer answer (JSON, then binary outputs) and its extra headers."""
    resp = pb.ModelInferResponse.FromString(data)
    raws = list(resp.raw_output_contents)
    blobs: list[bytes] = []
    outputs = []
    for i, t in enumerate(resp.outputs):
        raw = raws[i] if i < len(raws) else None
        o: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = params_json(t.parameters)
        if binary_out is None or t.name in binary_out:
            if raw is None:
                raw = encode_raw(t.datatype, list(getattr(t.contents, TYPED_FIELD[t.datatype])))
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        else:
            try:
                o["data"] = tensor_values(t.name, t.datatype, list(t.shape), t.contents, raw)
            except DecodeProblem as e:
                raise RestError(500, f"the model's answer cannot be read: {e}") from None
        if params:
            o["parameters"] = params
        outputs.append(o)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = params_json(resp.parameters)
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def metadata_json(data: bytes) -> dict[str, Any]:
    """ModelMetadataResponse as KServe's `$metadata_model_response` (shapes as numbers)."""
    m = pb.ModelMetadataResponse.FromString(data)

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    doc: dict[str, Any] = {"name": m.name, "versions": list(m.versions),
                           "platform": m.platform, "inputs": tensors(m.inputs),
                           "outputs": tensors(m.outputs)}
    return doc
