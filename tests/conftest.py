"""Shared fixtures: real gateways on port 0, real replicas, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.pb import text_model_pb2, text_model_pb2_grpc

TEXT_APP = {
    "name": "text",
    "deployments": [
        {"name": "TextModel", "import_path": "examples.models:TextModel", "num_replicas": 1}
    ],
}
IRIS_APP = {
    "name": "classifier",
    "deployments": [{"name": "Iris", "import_path": "examples.models:Iris", "num_replicas": 1}],
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The in-process tests run on the loop `gateway run` uses by default (proxy.event_loop):
    asyncio's. GATEWAY_TEST_LOOP=uvloop runs them on uvloop instead."""
    if os.environ.get("GATEWAY_TEST_LOOP", "asyncio") != "uvloop":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


def gateway_config(apps: list[dict[str, Any]], tmp: Path, **top: Any) -> GatewayConfig:
    """A config on ephemeral ports (proxy, admin, metrics) logging under `tmp`."""
    data: dict[str, Any] = {
        "proxy": {"port": 0},
        "admin": {"port": 0},
        "metrics": {"prometheus": {"port": 0}},
        "logging_config": {"logs_dir": str(tmp / "logs")},
        "applications": copy.deepcopy(apps),
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig, tmp: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(config, logs_dir=tmp / "logs")
    await gw.start(ready_timeout=30)
    try:
        yield gw
    finally:
        await gw.stop(grace=2)


@pytest.fixture
def start_gateway(
    tmp_path: Path,
) -> Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]:
    """`async with start_gateway([apps...], **top_level_overrides) as gw:`"""

    def start(
        apps: list[dict[str, Any]], **top: Any
    ) -> contextlib.AbstractAsyncContextManager[Gateway]:
        return running_gateway(gateway_config(apps, tmp_path, **top), tmp_path)

    return start


@contextlib.asynccontextmanager
async def external_replica(
    servicer: Any = None, port: int = 0, tls: grpc.ServerCredentials | None = None
) -> AsyncIterator[tuple[grpc.aio.Server, int]]:
    """A plain grpc.aio server hosting `servicer` (default: the demo TextModel) on loopback
    (on TLS with `tls` credentials)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from examples.models import TextModel

    server = grpc.aio.server()
    text_model_pb2_grpc.add_TextModelServicer_to_server(servicer or TextModel(), server)
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    address = f"127.0.0.1:{port}"
    bound = (server.add_insecure_port(address) if tls is None
             else server.add_secure_port(address, tls))
    await server.start()
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield server, bound
    finally:
        await server.stop(0)


def text_stub(channel: grpc.aio.Channel) -> text_model_pb2_grpc.TextModelStub:
    return text_model_pb2_grpc.TextModelStub(channel)


def md(app: str | None = "text", **extra: str) -> tuple[tuple[str, str], ...]:
    out = [] if app is None else [("application", app)]
    out += [(k.replace("_", "-") if k != "request_id" else k, v) for k, v in extra.items()]
    return tuple(out)


PredictRequest = text_model_pb2.PredictRequest


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's figures (tests/test_faults_suite.py), one table for every case run."""
    from tests.fault_harness import RESULTS, table

    if RESULTS:
        terminalreporter.write_sep("=", "fault suite")
        terminalreporter.write_line(table())
