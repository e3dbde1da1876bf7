"""JSON transcoding: `POST /{package.Service}/{Method}` with protobuf's JSON mapping.

Any method the gateway knows by descriptor (built-in protos, `proto_modules`, reflection).
Unary answers are one JSON object; server-streaming answers are newline-delimited JSON in
grpc-gateway's shape (`{"result": ...}` per message, `{"error": ...}` if the stream fails).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, message_factory

from gateway.ingress.http.errors import RestError, parse_json


def message_class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)


def request_bytes(method: Any, body: bytes) -> bytes:
    """The method's request message, serialized, from a JSON body (empty body: empty message)."""
    cls = message_class(method.input_type)
    if not body.strip():
        return b""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise RestError(400, f"the body must be a JSON object ({method.input_type.full_name})")
    try:
        msg = json_format.ParseDict(doc, cls())
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise RestError(400, f"{method.input_type.full_name}: {e}") from None
    out: bytes = msg.SerializeToString()
    return out


def response_json(method: Any, data: bytes) -> dict[str, Any]:
    cls = message_class(method.output_type)
    out: dict[str, Any] = json_format.MessageToDict(cls.FromString(data))
    return out


def ndjson_line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
