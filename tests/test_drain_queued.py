"""Calls that wait inside grpc (not yet handed to the gateway) while a drain shuts the listener
are refused UNAVAILABLE "draining", not CANCELLED by the shutdown: when the drain finds nothing
in flight, and when the loop is busy during the drain's quiet wait. A held refusal is answered
before its client's deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.app import Gateway
from gateway.pb import text_model_pb2
from tests.conftest import TEXT_APP, gateway_config, md, running_gateway, text_stub

CLIENTS = 6
"""grpc.aio takes new calls from core one at a time: the others wait there."""


async def _late_calls(tmp_path: Path, arrange: Callable[[Gateway, threading.Event], None]
                      ) -> list[Any]:
    """Each client sends one call when `go` is set (by what `arrange` set up on the gateway),
    then the gateway drains; what each client got."""
    warm, go = threading.Barrier(CLIENTS + 1), threading.Event()
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
        threads = [threading.Thread(target=client, args=(gw.address,)) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        await asyncio.to_thread(warm.wait, 10)
        arrange(gw, go)
        await gw.stop(grace=2)
        for t in threads:
            await asyncio.to_thread(t.join, 10)
    assert len(result) == CLIENTS
    return result


def _all_refused(result: list[Any]) -> bool:
    return all(r != "OK" and r[0] is grpc.StatusCode.UNAVAILABLE
               and "draining" in r[1].lower() for r in result)


async def test_a_call_queued_in_grpc_when_the_drain_starts_is_refused_not_cancelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def arrange(gw: Gateway, go: threading.Event) -> None:
        real = gw.health.enter_graceful_shutdown

        async def drain_busy() -> None:
            await real()
            # Nothing is in flight; the loop is busy while the clients' calls come in, so
            # grpc holds them until the loop can take them: after this, the drain goes on
            # without giving the loop a turn.
            go.set()
            time.sleep(0.3)  # noqa: ASYNC251 - the busy loop is the point

        monkeypatch.setattr(gw.health, "enter_graceful_shutdown", drain_busy)

    result = await _late_calls(tmp_path, arrange)
    assert _all_refused(result), result


@pytest.mark.parametrize(("at", "stall"), [
    (0.03, 0.3),  # longer than the quiet wait, inside it
    (0.085, 0.02),  # short, at the end of it (breaker: 11 of 12 calls were CANCELLED)
    (0.095, 0.018),  # shorter, at its very end (breaker: 7 of 8 CANCELLED with 12 ms steps)
])
async def test_a_loop_busy_during_the_quiet_wait_does_not_count_as_quiet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: float, stall: float) -> None:
    def arrange(gw: Gateway, go: threading.Event) -> None:
        real = gw._shut_listener

        def busy() -> None:
            go.set()
            time.sleep(stall)

        async def shut(server: grpc.aio.Server) -> None:
            asyncio.get_running_loop().call_later(at, busy)
            await real(server)

        monkeypatch.setattr(gw, "_shut_listener", shut)

    result = await _late_calls(tmp_path, arrange)
    assert _all_refused(result), result


async def test_a_held_refusal_is_answered_before_the_clients_deadline(
        start_gateway: Any) -> None:
    """A refusal held through the drain's quiet wait (0.1 s at least) still reaches a client
    whose deadline is shorter, as the UNAVAILABLE it may retry elsewhere."""
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        await stub.Predict(text_model_pb2.PredictRequest(text="warm"), metadata=md("text"),
                           timeout=10)
        stopping = asyncio.ensure_future(gw.stop(grace=2))
        while not gw.proxy.draining:
            await asyncio.sleep(0.005)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(text_model_pb2.PredictRequest(text="late"),
                               metadata=md("text"), timeout=0.08)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE, e.value
        assert "draining" in (e.value.details() or "").lower()
        await stopping
