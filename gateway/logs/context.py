"""The call a log line belongs to: request id and route, and the filter that stamps them."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.dataplane.call import REQUEST_ID_KEYS


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    route: str


_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "gateway_call", default=None
)


def current_request_id() -> str:
    """The request id of the call being served (in a replica), or ""."""
    c = _call.get()
    return c.request_id if c is not None else ""


@contextlib.contextmanager
def call_context(request_id: str, route: str) -> Iterator[None]:
    token = _call.set(CallContext(request_id, route))
    try:
        yield
    finally:
        _call.reset(token)


class ContextFilter(logging.Filter):
    """Gives every record the component's identity and the current call's request id/route.

    Fields a record already has (the access log sets them per call) are kept.
    """

    def __init__(
        self, component: str, application: str = "", deployment: str = "", replica: str = ""
    ) -> None:
        super().__init__()
        self.component = component
        self.identity = {"application": application, "deployment": deployment,
                         "replica": replica}

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        if "component" not in d:
            d["component"] = self.component
        for key, value in self.identity.items():
            if key not in d:
                d[key] = value
        if "request_id" not in d or "route" not in d:
            c = _call.get()
            d.setdefault("request_id", c.request_id if c is not None else "")
            d.setdefault("route", c.route if c is not None else "")
        return True


def request_id_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key in REQUEST_ID_KEYS:
            return str(value)
    return ""
