"""The admin service and the `gateway status / config / deploy / shutdown` commands."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

import gateway
from gateway.admin.service import AdminAuthError, AdminClient, AdminError, AdminUnreachable
from gateway.app import Gateway
from gateway.pb import admin_pb2, admin_pb2_grpc
from tests.conftest import TEXT_APP
from tests.ops_support import REPO

TOKEN = "admin-t0ken-do-not-print"
ARIZE_KEY = "arize-key-do-not-print"
BROKEN_APP = {
    "name": "broken",
    "deployments": [{"name": "Broken", "import_path": "examples.models:Broken",
                     "num_replicas": 1}],
}
TWO_TEXT = {
    "name": "text",
    "deployments": [{"name": "TextModel", "import_path": "examples.models:TextModel",
                     "num_replicas": 2}],
}


async def cli(*args: str) -> tuple[int, str, str]:
    """The real `gateway` command in a child process (the gateway runs on this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def admin_address(gw: Gateway) -> str:
    return f"127.0.0.1:{gw.admin_port}"


async def wait_status(gw: Gateway, pred: Any, timeout: float = 30.0) -> gateway.GatewayStatus:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        st = await asyncio.to_thread(gateway.status, admin_address(gw))
        if pred(st) or asyncio.get_running_loop().time() > deadline:
            return st
        await asyncio.sleep(0.1)


async def test_status_yaml_matches_the_running_gateway(start_gateway: Any) -> None:
    async with start_gateway([TWO_TEXT, BROKEN_APP]) as gw:
        # The broken replica is restarted with backoff; wait until it shows UNHEALTHY.
        await wait_status(gw, lambda s: s.applications["broken"].deployments["Broken"]
                          .message != "")
        rc, out, err = await cli("status", "--address", admin_address(gw))
        assert rc == 0, err
        doc = yaml.safe_load(out)
        assert set(doc) == {"proxies", "applications"}
        assert list(doc["proxies"].values()) == ["HEALTHY"]
        assert next(iter(doc["proxies"])).endswith(f":{gw.port}")

        text = doc["applications"]["text"]
        assert text["status"] == "RUNNING" == gw.controller.apps["text"].status
        assert text["message"] == ""
        assert text["last_deployed_time_s"] == pytest.approx(
            gw.controller.apps["text"].deployed_at)
        assert text["deployments"] == {
            "TextModel": {"status": "HEALTHY", "replica_states": {"RUNNING": 2}, "message": ""}
        }

        broken = doc["applications"]["broken"]
        assert broken["status"] == "DEPLOY_FAILED"
        dep = broken["deployments"]["Broken"]
        assert dep["status"] == "UNHEALTHY"
        # Between two restart attempts it is UNHEALTHY; during one, RECOVERING.
        assert list(dep["replica_states"].values()) == [1]
        assert set(dep["replica_states"]) <= {"UNHEALTHY", "RECOVERING"}
        # Says why: the exception the constructor raised.
        assert "RuntimeError: model weights not found at /models/broken.bin" in dep["message"]
        assert "model weights not found" in broken["message"]

        rc, out, _ = await cli("status", "-a", admin_address(gw), "--verbose")
        replicas = yaml.safe_load(out)["applications"]["text"]["deployments"]["TextModel"][
            "replicas"]
        slots = gw.controller.apps["text"].deployments["TextModel"].slots
        assert sorted(r["replica_id"] for r in replicas) == sorted(s.replica_id for s in slots)
        assert sorted(r["pid"] for r in replicas) == sorted(s.pid or 0 for s in slots)


async def test_python_status_api_returns_dataclasses(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw:
        st = await asyncio.to_thread(gateway.status, admin_address(gw))
    assert isinstance(st, gateway.GatewayStatus)
    assert [p.status for p in st.proxies.values()] == ["HEALTHY"]
    assert [p.address for p in st.proxies.values()] == [gw.address]
    app = st.applications["text"]
    assert app.status == "RUNNING"
    dep = app.deployments["TextModel"]
    assert dep.status == "HEALTHY" and dep.replica_states == {"RUNNING": 1}
    assert dep.replicas[0].state == "RUNNING" and dep.replicas[0].pid > 0
    assert dep.replicas[0].address.startswith("127.0.0.1:")


async def test_shutdown_drains_a_call_in_flight_then_stops(start_gateway: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gateway.pb import text_model_pb2
    from tests.conftest import md, text_stub

    async with start_gateway([TEXT_APP], proxy={"graceful_shutdown_timeout_s": 10}) as gw:
        async with grpc.aio.insecure_channel(gw.address) as ch:
            slow = asyncio.ensure_future(text_stub(ch).Predict(
                text_model_pb2.PredictRequest(text="good", sleep_s=1.5), metadata=md("text"),
                timeout=20))
            while gw.proxy.ongoing == 0:
                await asyncio.sleep(0.01)
            client = AdminClient(admin_address(gw))
            msg = await asyncio.to_thread(client.shutdown)
            assert msg == "draining: 1 call(s) in flight get up to 10s to finish"
            st = await asyncio.to_thread(client.status)
            assert [p.status for p in st.proxies.values()] == ["DRAINING"]
            # Closed to new calls, and probes say so ...
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="late"),
                                            metadata=md("text"), timeout=5)
            assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "draining" in (exc.value.details() or "")
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # ... while the accepted call finishes.
            resp = await slow
            assert resp.label == "positive"
        await asyncio.wait_for(gw.wait_stopped(), 30)
        assert gw.state == "DRAINED"
        assert all(s.process is None or s.process.returncode is not None
                   for _, s in gw.controller.slots())
        with pytest.raises(AdminUnreachable):
            await asyncio.to_thread(client.status)
        client.close()


async def test_config_prints_the_goal_state_with_secrets_redacted(start_gateway: Any) -> None:
    async with start_gateway(
        [TEXT_APP],
        admin={"token": TOKEN},
        records={"arize": {"api_key": ARIZE_KEY, "space_id": "space-do-not-print"}},
        metrics={"otlp": {"headers": {"x-api-key": "otlp-do-not-print"}}},
    ) as gw:
        rc, out, err = await cli("config", "-a", admin_address(gw), "--token", TOKEN)
        rc_status, status_out, _ = await cli("status", "-a", admin_address(gw), "--token", TOKEN)
        log_text = (gw.logs_dir / "gateway.log").read_text()
    assert rc == 0, err
    assert rc_status == 0
    for secret in (TOKEN, ARIZE_KEY, "space-do-not-print", "otlp-do-not-print"):
        assert secret not in out
        assert secret not in status_out
        assert secret not in log_text
    doc = yaml.safe_load(out)
    assert doc["admin"]["token"] == "**********"
    assert doc["records"]["arize"]["api_key"] == "**********"
    assert doc["metrics"]["otlp"]["headers"] == {"x-api-key": "**********"}
    assert [a["name"] for a in doc["applications"]] == ["text"]
    assert doc["applications"][0]["deployments"][0]["import_path"] == "examples.models:TextModel"


async def test_wrong_or_missing_token_is_refused(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP], admin={"token": TOKEN}) as gw:
        addr = admin_address(gw)
        for token in (None, "wrong-token"):
            md = (("authorization", f"Bearer {token}"),) if token else ()
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = admin_pb2_grpc.GatewayAdminStub(ch)
                for call in (stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=md),
                             stub.Shutdown(admin_pb2.ShutdownRequest(), metadata=md),
                             stub.Deploy(admin_pb2.DeployRequest(config_yaml="{}"),
                                         metadata=md)):
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await call
                    assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
                    assert TOKEN not in (exc.value.details() or "")
        # Nothing the refused calls asked for happened.
        assert gw.state == "HEALTHY"
        assert list(gw.controller.apps) == ["text"]

        with pytest.raises(AdminAuthError):
            await asyncio.to_thread(gateway.status, addr, "wrong-token")
        rc, _, err = await cli("shutdown", "-a", addr, "--token", "wrong-token")
        assert rc == 4 and "refused the admin token" in err and "wrong-token" not in err
        rc, _, err = await cli("status", "-a", addr)
        assert rc == 4 and "--token" in err
        st = await asyncio.to_thread(gateway.status, addr, TOKEN)
        assert st.applications["text"].status == "RUNNING"


async def test_unreachable_gateway_gets_a_clear_message() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = await cli("status", "--address", f"127.0.0.1:{port}", "--timeout", "3")
    assert rc == 3
    assert f"cannot reach the gateway admin service at 127.0.0.1:{port}" in err
    assert "Traceback" not in err
    with pytest.raises(AdminUnreachable):
        gateway.status(f"127.0.0.1:{port}", timeout=3)


async def test_deploy_rejects_a_bad_config_and_keeps_running(
    start_gateway: Any, tmp_path: Path
) -> None:
    async with start_gateway([TEXT_APP]) as gw:
        addr = admin_address(gw)
        bad = tmp_path / "bad.yaml"
        bad.write_text("applications: [{name: a, deployments: [{name: D, num_replicas: -1}]}]\n")
        rc, _, err = await cli("deploy", str(bad), "-a", addr)
        assert rc == 2, err
        assert "applications[0].deployments[0].num_replicas" in err
        assert str(bad) in err and "Traceback" not in err

        client = AdminClient(addr)
        with pytest.raises(AdminError) as exc:
            await asyncio.to_thread(client.deploy, "applications: [unclosed", "x.yaml")
        assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "x.yaml: invalid YAML" in str(exc.value)
        client.close()

        rc, _, err = await cli("deploy", str(tmp_path / "missing.yaml"), "-a", addr)
        assert rc == 2 and "cannot read" in err
        assert gw.controller.apps["text"].status == "RUNNING"


async def test_log_actuals_delegates_to_the_record_pipeline(start_gateway: Any) -> None:
    class Pipeline:
        def __init__(self) -> None:
            self.got: list[tuple[str, list[str]]] = []

        def log_actuals(self, app: str, actuals: list[Any]) -> tuple[int, int, str]:
            self.got.append((app, [a.prediction_id for a in actuals]))
            return len(actuals), 0, "ok"

    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(
        admin_address(gw)
    ) as ch:
        stub = admin_pb2_grpc.GatewayAdminStub(ch)
        req = admin_pb2.LogActualsRequest(
            application="text", actuals=[admin_pb2.Actual(prediction_id="p1",
                                                          actual_label="yes")])
        saved = gw.records
        pipeline = Pipeline()
        gw.records = pipeline  # type: ignore[attr-defined]
        resp = await stub.LogActuals(req)
        gw.records = saved  # type: ignore[attr-defined]
    assert (resp.accepted, resp.rejected, resp.message) == (1, 0, "ok")
    assert pipeline.got == [("text", ["p1"])]
