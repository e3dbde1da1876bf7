"""HTTP errors of the REST ingress: gRPC status -> HTTP status, KServe's `{"error": ...}` form."""

from __future__ import annotations

import json
from typing import Any

import grpc

_C = grpc.StatusCode
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    _C.OK: 200,
    _C.INVALID_ARGUMENT: 400, _C.FAILED_PRECONDITION: 400, _C.OUT_OF_RANGE: 400,
    _C.UNAUTHENTICATED: 401, _C.PERMISSION_DENIED: 403, _C.NOT_FOUND: 404,
    _C.ALREADY_EXISTS: 409, _C.ABORTED: 409, _C.RESOURCE_EXHAUSTED: 429, _C.CANCELLED: 499,
    _C.UNIMPLEMENTED: 501, _C.UNAVAILABLE: 503, _C.DEADLINE_EXCEEDED: 504,
}
"""The standard table (google.rpc / grpc-gateway); every other code is 500."""


def http_status(code: grpc.StatusCode) -> int:
    return GRPC_TO_HTTP.get(code, 500)


class RestError(Exception):
    """An answer with an HTTP error status and KServe's error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[RestError], tuple[int, str]]:
        # Raised in a conversion worker process (offload.py) and re-raised here.
        return RestError, (self.status, self.message)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def parse_json(body: bytes) -> Any:
    """Parsed JSON, or a 400 that says where it is broken."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RestError(400, f"the body is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RestError(400, f"invalid JSON at line {e.lineno} column {e.colno} "
                             f"(char {e.pos}): {e.msg}") from None
    except RecursionError:
        raise RestError(400, "invalid JSON: nested too deeply") from None
