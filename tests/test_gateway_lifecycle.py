"""The gateway process as an operator meets it: whose environment a deploy expands, a second
gateway on the same ports, a refused deploy that changes nothing, and a stop (signal or admin
shutdown) that arrives while the gateway is still starting."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from gateway.admin.service import AdminClient, AdminError
from gateway.app import Gateway, ProxyState
from gateway.config_source import DeployError
from gateway.pb import text_model_pb2
from tests.conftest import TEXT_APP, gateway_config, md, running_gateway, text_stub
from tests.ops_support import REPO

DEPLOY = """
proxy: {{port: 0}}
admin: {{port: 0}}
metrics: {{prometheus: {{port: 0}}}}
logging_config: {{logs_dir: {logs}}}
applications:
  - name: text
    {ingress}
    deployments:
      - {{name: TextModel, import_path: "examples.models:TextModel",
         user_config: {{prefix: "{prefix}"}}}}
"""


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def label(gw: Gateway) -> str:
    async with grpc.aio.insecure_channel(gw.address) as ch:
        r = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                        metadata=md("text"), timeout=10)
    return str(r.label)


async def test_deploy_expands_variables_in_the_operators_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFIX", raising=False)
    monkeypatch.setenv("GW_ONLY_SECRET", "sk-live-SECRET-1234")  # the gateway's own env
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        address = f"127.0.0.1:{gw.admin_port}"
        operator = {k: v for k, v in os.environ.items() if k != "GW_ONLY_SECRET"}
        path = tmp_path / "deploy.yaml"
        path.write_text(DEPLOY.format(logs=tmp_path / "logs", ingress="", prefix="${PREFIX}"))
        # `check` and `deploy` in the operator's shell agree.
        rc, out = await cli("check", str(path), env={**operator, "PREFIX": "v2-"})
        assert rc == 0, out
        rc, out = await cli("deploy", "-a", address, str(path),
                            env={**operator, "PREFIX": "v2-"})
        assert rc == 0, out
        assert await label(gw) == "v2-positive"
        # A variable only the gateway has is not the operator's: refused, never echoed.
        path.write_text(DEPLOY.format(logs=tmp_path / "logs", prefix="x",
                                      ingress='ingress: "${GW_ONLY_SECRET}"'))
        rc, out = await cli("deploy", "-a", address, str(path), env=operator)
        assert rc == 2 and "${GW_ONLY_SECRET} is not set" in out
        assert "sk-live" not in out
        # Set in the operator's shell and invalid there: the error names the variable only.
        rc, out = await cli("deploy", "-a", address, str(path),
                            env={**operator, "GW_ONLY_SECRET": "sk-op-SECRET-99"})
        assert rc == 2 and "sk-op-SECRET" not in out and "${GW_ONLY_SECRET}" in out
        # A raw admin call with a reference left in: refused with a clear reason.
        with AdminClient(address) as client, pytest.raises(AdminError) as e:
            await asyncio.to_thread(client.deploy, DEPLOY.format(
                logs=tmp_path / "logs", ingress="", prefix="${GW_ONLY_SECRET}"))
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "gateway deploy" in str(e.value) and "sk-live" not in str(e.value)
        assert await label(gw) == "v2-positive"


async def test_deploy_never_echoes_an_expanded_value_and_keeps_a_literal_dollar_brace(
        tmp_path: Path) -> None:
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        address = f"127.0.0.1:{gw.admin_port}"
        path = tmp_path / "deploy.yaml"
        text = DEPLOY.format(logs=tmp_path / "logs", ingress="", prefix="x")
        # A proto module named by a variable: the gateway's reply and log name neither.
        path.write_text(text.replace("applications:", 'proto_modules: ["${API_KEY}"]\n'
                                     "applications:"))
        rc, out = await cli("deploy", "-a", address, str(path),
                            env={**os.environ, "API_KEY": "sk-AbcdSECRET"})
        assert rc == 1 and "proto_modules[0]" in out and "SECRET" not in out, out
        # An escaped form of the value (a backslash doubled by repr) is masked too.
        bad = DEPLOY.format(logs=tmp_path / "logs", ingress="", prefix="x").replace(
            '"examples.models:TextModel"', '"${API_KEY}"')
        path.write_text(bad)
        for key in ("sk-Abc\\d3fSECRET", "sk-AbcSECRET\t"):
            rc, out = await cli("check", str(path), env={**os.environ, "API_KEY": key})
            assert rc == 2 and "SECRET" not in out and "${API_KEY}" in out, out
            rc, out = await cli("deploy", "-a", address, str(path),
                                env={**os.environ, "API_KEY": key})
            assert rc == 2 and "SECRET" not in out and "${API_KEY}" in out, out
        # A value holding `${` and a literal `$${` in the file both arrive as written.
        path.write_text(DEPLOY.format(logs=tmp_path / "logs", ingress="",
                                      prefix="${PREFIX}$${lit}-"))
        rc, out = await cli("deploy", "-a", address, str(path),
                            env={**os.environ, "PREFIX": "pa${ss}"})
        assert rc == 0, out
        assert await label(gw) == "pa${ss}${lit}-positive"
    assert "SECRET" not in (tmp_path / "logs" / "gateway.log").read_text()


async def test_an_ipv6_loopback_admin_and_proxy_listen(tmp_path: Path) -> None:
    config = gateway_config([TEXT_APP], tmp_path, proxy={"host": "::1"},
                            admin={"host": "[::1]"}, metrics={"prometheus": {"host": "[::1]"}})
    async with running_gateway(config, tmp_path) as gw:
        assert gw.address.startswith("[::1]:")
        assert await label(gw) == "positive"
        with AdminClient(f"[::1]:{gw.admin_port}") as client:
            status = await asyncio.to_thread(client.status)
        assert status.applications["text"].status == "RUNNING"


async def test_a_second_gateway_cannot_take_the_same_ports(tmp_path: Path) -> None:
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        for top in ({"proxy": {"port": gw.port}}, {"admin": {"port": gw.admin_port}}):
            second = Gateway(gateway_config([], tmp_path / "b", **top),
                             logs_dir=tmp_path / "b" / "logs")
            with pytest.raises(OSError, match="listen on"):
                await second.start(ready_timeout=5)
        assert await label(gw) == "positive"


async def test_a_refused_deploy_changes_nothing(tmp_path: Path) -> None:
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        before = gw.config
        extra = {"name": "extra", "deployments": [
            {"name": "X", "import_path": "examples.models:TextModel"}]}
        bad = gateway_config([TEXT_APP, extra], tmp_path, proto_modules=["no_such_pb2"])
        with pytest.raises(DeployError, match=r"proto_modules\[0\]: the module does not import"):
            await gw.apply(bad)
        assert gw.config is before and "extra" not in gw.controller.apps
        address = gw.address
        moved = gateway_config([TEXT_APP], tmp_path, proxy={"host": "0.0.0.0", "port": 0})
        assert await gw.apply(moved) == []
        assert gw.address == address  # the listener that is bound, until a restart


async def test_shutdown_while_starting_stops_and_stays_drained(tmp_path: Path) -> None:
    slow = {"name": "slow", "deployments": [
        {"name": "S", "import_path": "tests.control_models:VerySlowStart"}]}
    gw = Gateway(gateway_config([slow], tmp_path), logs_dir=tmp_path / "logs")
    t0 = time.monotonic()
    start = asyncio.ensure_future(gw.start(ready_timeout=40))
    try:
        end = time.monotonic() + 10
        while not gw.admin_port and time.monotonic() < end:
            await asyncio.sleep(0.05)
        with AdminClient(f"127.0.0.1:{gw.admin_port}") as client:
            await asyncio.to_thread(client.shutdown)
        await asyncio.wait_for(gw.wait_stopped(), 15)
        await asyncio.wait_for(start, 5)
        assert gw.state == ProxyState.DRAINED
        assert time.monotonic() - t0 < 15
    finally:
        if not start.done():
            start.cancel()
        await gw.stop(0)


def test_sigterm_while_starting_stops_promptly(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"""
proxy: {{port: 0}}
admin: {{port: 0}}
metrics: {{prometheus: {{port: 0}}}}
logging_config: {{logs_dir: {tmp_path / 'logs'}}}
applications:
  - name: slow
    deployments: [{{name: S, import_path: "tests.control_models:VerySlowStart"}}]
""")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = tmp_path / "logs" / "gateway.log"
        end = time.monotonic() + 20
        while time.monotonic() < end and "admin service listening" not in (
                log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert took < 12, f"took {took:.1f}s to stop:\n{out}"
    assert "stopped" in out


