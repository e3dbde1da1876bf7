"""Routing a call: which application it names (the `application` key, or the only one), its
request id (`x-request-id`, else Ray's `request_id`, else a new one), and the metadata that goes
on to the replica."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.dataplane import errors
from gateway.dataplane.call import (
    HOP_BY_HOP,
    MAX_REQUEST_ID_LEN,
    new_request_id,
    valid_request_id,
)
from gateway.dataplane.errors import GatewayError
from gateway.dataplane.router import Router


class AppRoute:
    """Everything the proxy needs for one application, built when the config is applied."""

    __slots__ = ("capture", "deployment", "model_id_of", "name", "router", "stream_capture")

    def __init__(self, name: str, router: Router) -> None:
        self.name = name
        self.deployment = router.deployment
        self.router = router
        self.capture: Callable[[str], bool] | None = None
        """Set by the record pipeline: decides per method whether to keep the payloads."""
        self.stream_capture: Callable[[str], Any] | None = None
        """Set by the record pipeline: for a sampled streaming call, an object that keeps its
        messages (`requests_of`, `response`, `done`; gateway/records/capture.py), else None."""
        self.model_id_of: Callable[[str, Any], str | None] | None = None
        """Set for `multiplexed_model_id_from: oip_model_name` (dataplane/oip_model_id.py)."""


def route_call(
    ctx: Any, routes: dict[str, AppRoute], default_route: AppRoute | None
) -> tuple[AppRoute | None, str, list[tuple[str, Any]], str | None, GatewayError | None]:
    """The call's route, request id, the metadata to forward, its multiplexed model id (or
    None), and why it is refused (or None).

    A refusal still carries what is known (application, deployment, a request id), so
    it is answered, counted and logged with them.
    """
    app: str | None = None
    rid: str | None = None
    rid_key = "x-request-id"
    alt: str | None = None
    fwd: list[tuple[str, Any]] = []
    mid: str | None = None  # routes by model (gateway/dataplane/model_affinity.py)
    for key, value in ctx.invocation_metadata() or ():
        if key in HOP_BY_HOP:
            continue
        if key == "application":
            app = value
        elif key == "x-request-id":
            if rid is None:
                rid = value
            continue
        elif key == "request_id":
            if alt is None:
                alt = value
            continue
        elif key == "multiplexed_model_id" and mid is None:
            mid = value  # the first, as the replica reads it
        fwd.append((key, value))
    if not rid:
        # x-request-id wins over Ray's request_id when both are sent.
        rid, rid_key = alt, "request_id"
    bad: GatewayError | None = None
    if rid and not valid_request_id(rid):
        bad = errors.bad_request_id(rid_key, rid, MAX_REQUEST_ID_LEN)
        rid = None
    if not rid:
        rid = new_request_id()
    fwd.append(("x-request-id", rid))
    err: GatewayError | None = None
    route: AppRoute | None = None
    if app is None:
        route = default_route
        if route is None:
            err = errors.application_missing(routes)
    else:
        route = routes.get(app)
        if route is None:
            err = errors.application_unknown(app, routes)
    return route, rid, fwd, mid, err or bad
