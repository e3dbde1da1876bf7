"""Helpers for the HTTP ingress tests: real clients (requests) run off the test's loop."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import requests

from tests.conftest import IRIS_APP, TEXT_APP

HTTP = {"enabled": True, "port": 0}
ROWS = [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3)]
PREDICT = "/demo.text.TextModel/Predict"


def app(base: dict[str, Any], name: str | None = None, prefix: str | None = None,
        **deployment: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    if name is not None:
        out["name"] = name
    if prefix is not None:
        out["route_prefix"] = prefix
    out["deployments"][0].update(deployment)
    return out


def text(prefix: str | None = "/text", **kw: Any) -> dict[str, Any]:
    return app(TEXT_APP, prefix=prefix, **kw)


def iris(prefix: str | None = "/iris", **kw: Any) -> dict[str, Any]:
    return app(IRIS_APP, prefix=prefix, **kw)


def url(gw: Any, path: str) -> str:
    assert gw.http is not None and gw.http.port
    return f"http://127.0.0.1:{gw.http.port}{path}"


async def call(method: str, address: str, **kw: Any) -> requests.Response:
    """One HTTP request with a timeout, in a thread (the gateway runs on this loop)."""
    kw.setdefault("timeout", 10)
    return await asyncio.to_thread(requests.request, method, address, **kw)


def infer_body(rows: list[tuple[float, ...]] = ROWS, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": [len(rows), 4], "datatype": "FP32",
                        "data": [list(r) for r in rows]}], **extra}
