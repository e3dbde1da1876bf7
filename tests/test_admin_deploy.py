"""`gateway deploy` on a running gateway while a client keeps calling: scale up, change
`user_config` (replicas go through `reconfigure`), add and remove an application, scale down;
no call of the application that stays fails."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from gateway.admin.service import AdminClient
from gateway.app import Gateway
from gateway.pb import text_model_pb2
from tests.conftest import IRIS_APP, md, text_stub
from tests.test_admin import cli

MAX_CALLS = 20_000
MAX_SECONDS = 90.0


def goal(tmp: Path, replicas: int, user_config: dict[str, Any] | None,
         extra_apps: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    dep: dict[str, Any] = {"name": "TextModel", "import_path": "examples.models:TextModel",
                           "num_replicas": replicas, "max_ongoing_requests": 8,
                           "graceful_shutdown_timeout_s": 5}
    if user_config is not None:
        dep["user_config"] = user_config
    return {
        "proxy": {"port": 0},
        "admin": {"port": 0},
        "metrics": {"prometheus": {"port": 0}},
        "logging_config": {"logs_dir": str(tmp / "logs")},
        "applications": [{"name": "text", "deployments": [dep]},
                         *copy.deepcopy(list(extra_apps))],
    }


class Caller:
    """Calls the `text` application back to back; keeps every answer and every failure."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.answers: list[tuple[float, str, str]] = []  # (start time, label, replica)
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        end = time.monotonic() + MAX_SECONDS
        async with grpc.aio.insecure_channel(self.gw.address) as ch:
            stub = text_stub(ch)

            async def one_client() -> None:
                while not self._stop.is_set() and time.monotonic() < end:
                    if len(self.answers) + len(self.failures) >= MAX_CALLS:
                        return
                    t0 = time.monotonic()
                    try:
                        r = await stub.Predict(text_model_pb2.PredictRequest(text="good"),
                                               metadata=md("text"), timeout=10)
                        self.answers.append((t0, r.label, r.replica))
                    except grpc.aio.AioRpcError as e:
                        self.failures.append(f"{e.code().name}: {e.details()}")
                    await asyncio.sleep(0.005)

            await asyncio.gather(*(one_client() for _ in range(3)))

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def since(self, t: float) -> list[tuple[float, str, str]]:
        return [a for a in self.answers if a[0] >= t]


async def deploy(client: AdminClient, data: dict[str, Any]) -> str:
    return await asyncio.to_thread(client.deploy, yaml.safe_dump(data), "deploy-test.yaml")


async def until(pred: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.05)


def text_replicas(gw: Gateway) -> dict[str, int]:
    return gw.controller.apps["text"].deployments["TextModel"].replica_states()


async def test_deploy_scales_and_reconfigures_with_no_failed_call(
    start_gateway: Any, tmp_path: Path
) -> None:
    text_app = goal(tmp_path, 1, None)["applications"][0]
    async with start_gateway([text_app]) as gw:
        client = AdminClient(f"127.0.0.1:{gw.admin_port}")
        caller = Caller(gw)
        caller.start()
        await until(lambda: len(caller.answers) > 20)

        # Scale up, and add an application.
        msg = await deploy(client, goal(tmp_path, 3, None, [IRIS_APP]))
        assert msg == "deployed; applications: text, classifier"
        await until(lambda: text_replicas(gw) == {"RUNNING": 3})
        await until(lambda: gw.controller.apps["classifier"].status == "RUNNING")
        t_up = time.monotonic()
        await until(lambda: len({a[2] for a in caller.since(t_up)}) == 3)

        # Change user_config: every replica is reconfigured (UPDATING) in place.
        seen_states: set[str] = set()
        gw.controller.listeners.append(lambda event, slot: seen_states.add(event))
        pids = sorted(s.pid or 0 for s in gw.controller.apps["text"].deployments[
            "TextModel"].slots)
        await deploy(client, goal(tmp_path, 3, {"prefix": "v2-"}, [IRIS_APP]))
        t_v2 = time.monotonic()
        assert "updating" in seen_states
        assert text_replicas(gw) == {"RUNNING": 3}
        assert sorted(s.pid or 0 for s in gw.controller.apps["text"].deployments[
            "TextModel"].slots) == pids, "reconfigure must not restart replicas"
        await until(lambda: len(caller.since(t_v2)) > 30)
        # Calls sent after the deploy answered see the new config on every replica.
        after = caller.since(t_v2)
        assert {a[1] for a in after} == {"v2-positive"}
        assert len({a[2] for a in after}) == 3

        # Scale down and remove the other application, through the real CLI.
        cfg = tmp_path / "down.yaml"
        cfg.write_text(yaml.safe_dump(goal(tmp_path, 1, {"prefix": "v3-"})))
        rc, out, err = await cli("deploy", str(cfg), "--address", f"127.0.0.1:{gw.admin_port}")
        assert rc == 0, err
        assert out.strip() == "deployed; applications: text"
        t_down = time.monotonic()
        assert "classifier" not in gw.controller.apps
        await until(lambda: text_replicas(gw) == {"RUNNING": 1})
        await until(lambda: len(caller.since(t_down)) > 30)
        assert {a[1] for a in caller.since(t_down)} == {"v3-positive"}
        assert len({a[2] for a in caller.since(t_down)}) == 1

        await caller.stop()
        client.close()
        # The config the gateway reports is the one deployed last.
        rc, out, _ = await cli("config", "-a", f"127.0.0.1:{gw.admin_port}")
        deployed = yaml.safe_load(out)
        assert [a["name"] for a in deployed["applications"]] == ["text"]
        assert deployed["applications"][0]["deployments"][0]["user_config"] == {
            "prefix": "v3-"}

    assert caller.failures == [], caller.failures[:5]
    assert len(caller.answers) > 200


async def test_replica_starting_during_a_user_config_change_catches_up(
    start_gateway: Any, tmp_path: Path
) -> None:
    text_app = goal(tmp_path, 1, {"prefix": "a-"})["applications"][0]
    async with start_gateway([text_app]) as gw:
        client = AdminClient(f"127.0.0.1:{gw.admin_port}")
        # The second deploy lands while the new replicas still start with the first config.
        await deploy(client, goal(tmp_path, 3, {"prefix": "b-"}))
        slots = gw.controller.apps["text"].deployments["TextModel"].slots
        await deploy(client, goal(tmp_path, 3, {"prefix": "c-"}))
        # The race this test is about: those replicas were not running yet.
        assert any(s.state.value == "STARTING" for s in slots[1:])
        await until(lambda: text_replicas(gw) == {"RUNNING": 3}
                    and all(s.user_config == {"prefix": "c-"} for s in slots))
        labels: set[str] = set()
        replicas: set[str] = set()
        async with grpc.aio.insecure_channel(gw.address) as ch:
            for _ in range(30):
                r = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                                metadata=md("text"), timeout=10)
                labels.add(r.label)
                replicas.add(r.replica)
        client.close()
    assert labels == {"c-positive"}
    assert len(replicas) == 3
