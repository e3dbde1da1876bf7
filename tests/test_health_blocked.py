"""Health checks bounded by the gateway's own clock: a local replica that stops reading
(SIGSTOP) behind large requests still leaves rotation on the checks' timeout (grpc's own
deadline was seen to end the check only after ~19 s), and a gateway loop stalled past that
bound does not take a check answered in time for none."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.control import health
from gateway.control.state import DeploymentState, ReplicaSlot
from gateway.pb import text_model_pb2
from tests.conftest import gateway_config, md, running_gateway, text_stub


async def test_a_stopped_replica_behind_blocked_writes_leaves_rotation(tmp_path: Path) -> None:
    dep = {"name": "TextModel", "import_path": "examples.models:TextModel",
           "health_check_period_s": 0.5, "health_check_timeout_s": 0.5}
    apps = [{"name": "text", "deployments": [dep]}]
    async with running_gateway(gateway_config(apps, tmp_path), tmp_path) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        await stub.Predict(text_model_pb2.PredictRequest(text="warm"), metadata=md("text"),
                           timeout=10)
        slot = gw.controller.apps["text"].ingress.slots[0]
        assert slot.process is not None and slot.replica is not None
        pid = slot.process.pid
        big = "x" * (256 << 10)
        stop = False

        async def caller() -> None:  # fills the connection's window with unread requests
            while not stop:
                try:
                    await stub.Predict(text_model_pb2.PredictRequest(text=big),
                                       metadata=md("text"), timeout=0.2)
                except grpc.aio.AioRpcError:
                    pass

        os.kill(pid, signal.SIGSTOP)
        callers = [asyncio.ensure_future(caller()) for _ in range(8)]
        t0 = time.monotonic()
        try:
            while slot.replica.routable and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.1)
            out_after = time.monotonic() - t0
        finally:
            stop = True
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait(callers, timeout=10)
        # Three checks of 0.5 s (+0.5 s grace) at most, with room for a loaded machine.
        assert out_after < 6, f"still in rotation after {out_after:.1f}s"
        for _ in range(100):  # and back once it reads again
            if slot.replica is not None and slot.replica.routable:
                break
            await asyncio.sleep(0.1)
        assert (await stub.Predict(text_model_pb2.PredictRequest(text="after"),
                                   metadata=md("text"), timeout=10)).label


async def test_a_check_answered_while_the_loop_stalls_counts_as_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = {"name": "TextModel", "import_path": "examples.models:TextModel",
           "health_check_period_s": 0.5, "health_check_timeout_s": 0.3}
    verdicts: list[tuple[bool, str]] = []
    armed = False
    real = health.HealthChecks._check

    async def stalled(self: Any, d: DeploymentState, slot: ReplicaSlot) -> tuple[bool, str]:
        if armed and len(verdicts) < 3:
            # Once the check is sent, the loop is busy elsewhere for longer than the bound,
                # while grpc's threads take the answer. Two loop turns from now: the check's call is
                # sent in the next one (not a timer: uvloop runs due timers before the callbacks,
                # and the check would then not even be sent in time).
                loop = asyncio.get_running_loop()
                loop.call_soon(loop.call_soon, time.sleep, 1.0)
        verdict = await real(self, d, slot)
        verdicts.append(verdict)
        return verdict

    monkeypatch.setattr(health.HealthChecks, "_check", stalled)
    apps = [{"name": "text", "deployments": [dep]}]
    async with running_gateway(gateway_config(apps, tmp_path), tmp_path):
        verdicts.clear()
        armed = True
        for _ in range(200):
            if len(verdicts) >= 3:
                break
            await asyncio.sleep(0.1)
    assert verdicts[:3] == [(True, "")] * 3
