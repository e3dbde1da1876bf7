"""A call waiting inside grpc (not yet handed to the gateway) when a drain finds nothing in
flight is refused UNAVAILABLE "draining", not CANCELLED by the listener's shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.pb import text_model_pb2
from tests.conftest import TEXT_APP, gateway_config, md, running_gateway, text_stub


async def test_a_call_queued_in_grpc_when_the_drain_starts_is_refused_not_cancelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = 6  # grpc.aio takes new calls from core one at a time: the others wait there
    warm, go = threading.Barrier(clients + 1), threading.Event()
    result: list[Any] = []

    def client(address: str) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = text_stub(ch)
            stub.Predict(text_model_pb2.PredictRequest(text="warm"), metadata=md("text"),
                         timeout=10)
            warm.wait(10)
            go.wait(10)
            try:
                stub.Predict(text_model_pb2.PredictRequest(text="late"), metadata=md("text"),
                             timeout=10)
                result.append("OK")
            except grpc.RpcError as e:
                result.append((e.code(), e.details()))

    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        threads = [threading.Thread(target=client, args=(gw.address,))
                   for _ in range(clients)]
        for t in threads:
            t.start()
        await asyncio.to_thread(warm.wait, 10)
        real = gw.health.enter_graceful_shutdown

        async def drain_busy() -> None:
            await real()
            # Nothing is in flight; the loop is busy while the client's call comes in, so
            # grpc holds it until the loop can take it: after this, the drain goes on without
            # giving the loop a turn.
            go.set()
            time.sleep(0.3)  # noqa: ASYNC251 - the busy loop is the point

        monkeypatch.setattr(gw.health, "enter_graceful_shutdown", drain_busy)
        await gw.stop(grace=2)
        for t in threads:
            await asyncio.to_thread(t.join, 10)
    assert len(result) == clients
    assert all(r != "OK" and r[0] is grpc.StatusCode.UNAVAILABLE
               and "draining" in r[1].lower() for r in result), result
