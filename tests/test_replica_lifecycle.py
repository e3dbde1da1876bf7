"""The controller's replica lifecycle on real replica processes: reconfigure that overruns the
health check or fails, a model change that rolls, a crash loop that backs off, a replica that
floods its output pipe, and a status that does not depend on who read it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.admin.service import AdminClient, AdminError
from gateway.admin.status import build_status
from gateway.app import Gateway
from gateway.control.state import ReplicaSlot
from gateway.dataplane.replicas import ReplicaState
from gateway.pb import text_model_pb2
from tests.conftest import TEXT_APP, gateway_config, md, running_gateway, text_stub
from tests.test_admin_deploy import Caller


def app(import_path: str, name: str = "text", **dep: Any) -> dict[str, Any]:
    return {"name": name, "deployments": [
        {"name": "TextModel", "import_path": import_path, **dep}]}


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def slot_of(gw: Gateway, app_name: str = "text") -> ReplicaSlot:
    return gw.controller.apps[app_name].ingress.slots[0]


async def predict(gw: Gateway, text: str = "good", timeout: float = 10,
                  app_name: str = "text") -> text_model_pb2.PredictResponse:
    async with grpc.aio.insecure_channel(gw.address) as ch:
        return await text_stub(ch).Predict(text_model_pb2.PredictRequest(text=text),
                                           metadata=md(app_name), timeout=timeout)


async def test_reconfigure_that_overruns_the_health_check_returns_to_rotation(
        tmp_path: Path) -> None:
    dep = {"health_check_period_s": 0.2, "health_check_timeout_s": 0.3}
    apps = [app("tests.control_models:SlowReconfig", **dep)]
    async with running_gateway(gateway_config(apps, tmp_path), tmp_path) as gw:
        new = [app("tests.control_models:SlowReconfig",
                   user_config={"sleep": 1.5, "prefix": "v2-"}, **dep)]
        problems = await gw.apply(gateway_config(new, tmp_path))
        assert not problems
        slot = slot_of(gw)
        await until(lambda: slot.state is ReplicaState.RUNNING, 10, "RUNNING")
        await asyncio.sleep(0.6)  # a few health checks later
        assert slot.replica is not None and slot.replica.routable
        assert (await predict(gw, timeout=5)).label.startswith("v2-")
        assert build_status(gw).applications["text"].status == "RUNNING"


async def test_failed_reconfigure_leaves_rotation_backs_off_and_fails_the_deploy(
        tmp_path: Path) -> None:
    base = dict(num_replicas=1, health_check_period_s=0.2)
    apps = [app("tests.control_models:BadReconfig", user_config={"prefix": "v1-"}, **base)]
    config = gateway_config(apps, tmp_path)
    async with running_gateway(config, tmp_path) as gw:
        bad = gateway_config(
            [app("tests.control_models:BadReconfig", user_config={"fail": True}, **base)],
            tmp_path)
        import yaml

        text = yaml.safe_dump(bad.model_dump(mode="json"))
        with AdminClient(f"127.0.0.1:{gw.admin_port}") as client, \
                pytest.raises(AdminError) as err:
            await asyncio.to_thread(client.deploy, text)
        assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "reconfigure failed" in str(err.value)
        slot = slot_of(gw)
        assert slot.state is ReplicaState.UNHEALTHY
        assert slot.replica is not None and not slot.replica.routable
        status = build_status(gw).applications["text"]
        assert status.status == "UNHEALTHY" and "reconfigure failed" in status.message
        # Retried with back-off (0.2 s, 0.4 s, ...), not on every health check, and never
        # back in rotation with the old config meanwhile.
        for _ in range(20):
            await asyncio.sleep(0.1)
            assert not slot.replica.routable
        assert 1 <= slot.reconfigure_failures <= 4
        # A good config brings it back.
        good = gateway_config(
            [app("tests.control_models:BadReconfig", user_config={"prefix": "v3-"}, **base)],
            tmp_path)
        assert await gw.apply(good) == []
        await until(lambda: slot.state is ReplicaState.RUNNING, 10, "RUNNING")
        assert (await predict(gw, timeout=5)).label.startswith("v3-")


async def test_changing_the_model_rolls_without_a_gap(tmp_path: Path) -> None:
    apps = [app("examples.models:TextModel", num_replicas=1)]
    async with running_gateway(gateway_config(apps, tmp_path), tmp_path) as gw:
        caller = Caller(gw)
        caller.start()
        await until(lambda: len(caller.answers) > 5, 10, "first answers")
        new = [app("tests.control_models:SlowStart", num_replicas=1)]
        problems = await gw.apply(gateway_config(new, tmp_path))
        await until(lambda: any(a[1].startswith("new-") for a in caller.answers), 20,
                    "answers of the new model")
        await caller.stop()
        assert caller.failures == []
        assert problems == []
        assert len(gw.controller.apps["text"].ingress.slots) == 1


async def test_crash_loop_backs_off_further_and_says_so(tmp_path: Path) -> None:
    from gateway.control.process import RESTART_BACKOFF_MAX_S, restart_delay

    delays = [restart_delay(n) for n in range(1, 16)]
    assert delays == sorted(delays) and delays[-1] == RESTART_BACKOFF_MAX_S >= 60
    assert delays[5] == 2 * delays[4]
    apps = [app("tests.control_models:Crashing")]
    config = gateway_config(apps, tmp_path)
    gw = Gateway(config, logs_dir=tmp_path / "logs")
    try:
        await gw.start(ready_timeout=20)
        slot = slot_of(gw)
        await until(lambda: slot.crashes >= 3, 30, "three failed starts")
        msg = build_status(gw).applications["text"].deployments["TextModel"].message
        assert "cannot load the model" in msg
        assert "crash loop" in msg and "next restart in" in msg
    finally:
        await gw.stop(grace=1)


async def test_a_replica_flooding_its_output_keeps_serving_and_stops(tmp_path: Path) -> None:
    apps = [app("tests.control_models:Loud")]
    gw = Gateway(gateway_config(apps, tmp_path), logs_dir=tmp_path / "logs")
    await gw.start(ready_timeout=30)
    try:
        assert (await predict(gw, "loud", timeout=20)).label
        for _ in range(5):
            assert (await predict(gw, "loud", timeout=20)).label
    finally:
        t0 = time.monotonic()
        await asyncio.wait_for(gw.stop(grace=2), 40)
        assert time.monotonic() - t0 < 40
    log = (tmp_path / "logs" / "gateway.log").read_text()
    assert "[line continues]" in log


async def test_status_after_a_crash_does_not_depend_on_who_read_it(tmp_path: Path) -> None:
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        two = gateway_config([TEXT_APP, app("examples.models:TextModel", name="u")],
                             tmp_path)
        await gw.apply(two)
        u = slot_of(gw, "u")
        # Nobody reads the status meanwhile: only the slot's own state is looked at.
        await until(lambda: u.state is ReplicaState.RUNNING, 20, "u RUNNING")
        assert u.pid is not None
        os.kill(u.pid, signal.SIGKILL)
        await until(lambda: u.state is not ReplicaState.RUNNING, 10, "u noticed the crash")
        assert gw.controller.apps["u"].status == "UNHEALTHY"


async def test_a_roll_to_a_model_that_cannot_start_keeps_the_old_replicas(
        tmp_path: Path) -> None:
    good = gateway_config([app("examples.models:TextModel", num_replicas=2)], tmp_path)
    async with running_gateway(good, tmp_path) as gw:
        dep = gw.controller.apps["text"].ingress
        old = {s.replica_id for s in dep.slots}
        caller = Caller(gw)
        caller.start()
        await until(lambda: len(caller.answers) > 5, 10, "first answers")
        broken = gateway_config([app("tests.control_models:Crashing", num_replicas=2)],
                                tmp_path)
        problems = await gw.apply(broken)
        await asyncio.sleep(0.5)
        await caller.stop()
        assert problems and "cannot load the model" in problems[0]
        assert caller.failures == []
        # The roll stopped at the first new replica: both old ones still serve.
        assert {s.replica_id for s in dep.slots} == old
        assert all(s.state is ReplicaState.RUNNING for s in dep.slots)
        status = build_status(gw).applications["text"]
        assert status.status == "DEPLOY_FAILED"
        d = status.deployments["TextModel"]
        assert d.status == "DEPLOY_FAILED"
        assert "tests.control_models:Crashing" in d.message and "keep serving" in d.message
        assert (await predict(gw, timeout=5)).label
        # Deploying the revision that still serves accepts it.
        assert await gw.apply(good) == []
        assert build_status(gw).applications["text"].status == "RUNNING"
        assert {s.replica_id for s in dep.slots} == old


async def test_a_replica_crashing_soon_after_it_became_healthy_backs_off(
        tmp_path: Path) -> None:
    apps = [app("tests.control_models:DiesSoon", health_check_period_s=0.2)]
    gw = Gateway(gateway_config(apps, tmp_path), logs_dir=tmp_path / "logs")
    try:
        await gw.start(ready_timeout=20)
        slot = slot_of(gw)
        await until(lambda: slot.crashes >= 3, 40, "three crashes in a row")
        await until(lambda: "crash loop" in slot.message, 10, "crash loop in the status")
        msg = build_status(gw).applications["text"].deployments["TextModel"].message
        assert "crash loop" in msg and "exited with code 3" in msg
    finally:
        await gw.stop(grace=1)


async def test_reverting_a_failed_reconfigure_puts_the_replica_back_at_once(
        tmp_path: Path) -> None:
    base = dict(num_replicas=1, health_check_period_s=30)  # no health check to help
    good = gateway_config(
        [app("tests.control_models:BadReconfig", user_config={"prefix": "v1-"}, **base)],
        tmp_path)
    async with running_gateway(good, tmp_path) as gw:
        bad = gateway_config(
            [app("tests.control_models:BadReconfig", user_config={"fail": True}, **base)],
            tmp_path)
        assert await gw.apply(bad)
        slot = slot_of(gw)
        assert slot.state is ReplicaState.UNHEALTHY and slot.reconfigure_failures == 1
        # The operator deploys the previous config back: the replica still runs it.
        assert await gw.apply(good) == []
        assert slot.state is ReplicaState.RUNNING and slot.reconfigure_failures == 0
        assert slot.replica is not None and slot.replica.routable
        assert build_status(gw).applications["text"].status == "RUNNING"
        assert (await predict(gw, timeout=5)).label.startswith("v1-")


async def test_model_load_time_does_not_count_as_running_for_the_back_off_reset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model loads for 1.5 s, then its process dies at once: with a 1 s reset window,
    only time spent serving may reset the back-off, so the crashes add up."""
    from gateway.control import process as replica_process

    monkeypatch.setattr(replica_process, "RESTART_RESET_AFTER_S", 1.0)
    apps = [app("tests.control_models:SlowStartThenDies", health_check_period_s=0.2)]
    gw = Gateway(gateway_config(apps, tmp_path), logs_dir=tmp_path / "logs")
    try:
        await gw.start(ready_timeout=20)
        slot = slot_of(gw)
        await until(lambda: slot.crashes >= 2, 30, "two crashes in a row")
        assert "crash loop" in slot.message
    finally:
        await gw.stop(grace=1)


async def test_a_roll_interrupted_by_shutdown_says_the_gateway_is_stopping(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    apps = [app("examples.models:TextModel", num_replicas=1)]
    gw = Gateway(gateway_config(apps, tmp_path), logs_dir=tmp_path / "logs")
    await gw.start(ready_timeout=20)
    applying: asyncio.Task[list[str]] | None = None
    try:
        new = [app("tests.control_models:VerySlowStart", num_replicas=1)]
        applying = asyncio.ensure_future(gw.apply(gateway_config(new, tmp_path)))
        await until(lambda: len(gw.controller.apps["text"].ingress.slots) == 2, 10,
                    "the new replica starting")
        await asyncio.sleep(1.0)  # its model is loading now
    finally:
        await gw.stop(grace=1)
    assert applying is not None
    problems = await asyncio.wait_for(applying, 10)
    assert problems == ["text: TextModel: roll interrupted: the gateway is stopping"]
    errors = [r for r in caplog.records
              if r.levelname == "ERROR" and r.name.startswith("gateway.controller")]
    assert errors == [], [r.getMessage() for r in errors]
