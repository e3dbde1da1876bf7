"""The gRPC listener's catch-all handler: every method not served by the gateway itself is
forwarded, as bytes, to a replica of the application the call names.

Where a call goes: this handler (per method path, the driver of its shape) -> the forwarding
core (gateway/dataplane/forward.py: admission, replica choice through the application's
`Router`, retries, statuses; routing.py: application and request id) -> a replica
(gateway/dataplane/replicas.py, mux.py) -> the observers, with one `CallRecord`
(gateway/dataplane/call.py, gateway/hooks.py).
"""

from __future__ import annotations

import functools
from typing import Any

import grpc

from gateway.dataplane.call import (
    HOP_BY_HOP,
    MAX_REQUEST_ID_LEN,
    REQUEST_ID_KEYS,
    CallRecord,
    Observer,
    valid_request_id,
)
from gateway.dataplane.forward import HOLD_REFUSAL_S, Forwarder
from gateway.dataplane.methods import OTHER, MethodInfo, MethodTable
from gateway.dataplane.replicas import STREAM_STREAM, STREAM_UNARY, UNARY_STREAM, UNARY_UNARY
from gateway.dataplane.routing import AppRoute

__all__ = [  # importers of the names that lived here before the split keep them
    "HOLD_REFUSAL_S", "HOP_BY_HOP", "MAX_REQUEST_ID_LEN", "REQUEST_ID_KEYS", "AppRoute",
    "CallRecord", "Observer", "Proxy", "valid_request_id",
]


class Proxy(Forwarder, grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Routes by the `application` metadata key and forwards all four RPC shapes."""

    def __init__(
        self,
        methods: MethodTable,
        retries: int = 2,
        request_timeout_s: float | None = None,
    ) -> None:
        super().__init__(methods, retries, request_timeout_s)
        self._handlers: dict[str, Any] = {}

    # -- routing table -------------------------------------------------------------------

    def set_routes(self, routes: dict[str, AppRoute]) -> None:
        self.routes = dict(routes)
        self.known_seen = {a for a, r in self.routes.items() if r.router.known_method_seen}
        self.default_route = next(iter(routes.values())) if len(routes) == 1 else None

    # -- grpc.GenericRpcHandler ----------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        h = self._handlers.get(path)
        if h is not None:
            return h
        info = self.methods.get(path)
        h = self._make_handler(path, info)
        if info is not None or self.methods.admitted(path):
            # Other unknown paths are not cached: clients could grow this dict forever.
            self._handlers[path] = h
        return h

    def methods_learned(self) -> None:
        """New method shapes are known: handlers made before (as unknown) are made again,
        and a deployment's unknown-method warning goes once that method is known."""
        self._handlers.clear()
        self.known_seen.clear()
        for route in self.routes.values():
            seen = route.router.unknown_method
            if seen and self.methods.get(seen) is not None:
                route.router.unknown_method = ""

    def _make_handler(self, path: str, info: MethodInfo | None) -> Any:
        label = path if info is not None else OTHER
        if info is None or (info.client_streaming and info.server_streaming):
            # Unknown shape: a bidi stream carries any of the four shapes on the wire.
            # partial keeps it an async generator function, which is how grpc spots streams.
            ss = functools.partial(self.forward_stream, path, label, STREAM_STREAM)
            return grpc.stream_stream_rpc_method_handler(ss)
        if info.client_streaming:
            su = functools.partial(self.forward_unary, path, label, STREAM_UNARY)
            return grpc.stream_unary_rpc_method_handler(su)
        if info.server_streaming:
            us = functools.partial(self.forward_stream, path, label, UNARY_STREAM)
            return grpc.unary_stream_rpc_method_handler(us)
        # A partial of a coroutine function is still one to grpc: no extra coroutine per call.
        uu = functools.partial(self.forward_unary, path, label, UNARY_UNARY)
        return grpc.unary_unary_rpc_method_handler(uu)
