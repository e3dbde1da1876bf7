"""`proxy.event_loop`: `gateway run` serves on asyncio's loop by default, on uvloop when asked,
and on asyncio's loop with a warning naming the fix when uvloop cannot be imported."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import grpc
import pytest

from gateway.config import ConfigError, parse_config
from gateway.pb import text_model_pb2, text_model_pb2_grpc
from tests.ops_support import GatewayProcess, run_config, write_config

NO_UVLOOP = ("import sys; sys.modules['uvloop'] = None; from gateway.cli import main; "
             "sys.exit(main(sys.argv[1:]))")


def _served_and_drained(gp: GatewayProcess) -> str:
    """The loop the console names, after a call went through and SIGTERM drained it."""
    loop = gp.wait_for(r"gateway: event loop (\w+)", 10)
    with grpc.insecure_channel(gp.address) as ch:
        stub = text_model_pb2_grpc.TextModelStub(ch)
        fut = stub.Predict.future(text_model_pb2.PredictRequest(text="good"), timeout=20)
        assert fut.result().label == "positive"
    gp.proc.send_signal(signal.SIGTERM)
    assert gp.wait(30) == 0, gp.console()
    assert "gateway: stopped" in gp.console()
    return loop


UV = run_config(proxy=", event_loop: uvloop")


def test_default_is_asyncio(tmp_path: Path) -> None:
    with GatewayProcess(write_config(tmp_path, run_config())) as gp:
        assert _served_and_drained(gp) == "asyncio"
        assert "cannot be imported" not in gp.console()


def test_uvloop_when_asked(tmp_path: Path) -> None:
    with GatewayProcess(write_config(tmp_path, UV)) as gp:
        assert _served_and_drained(gp) == "uvloop"
        assert "cannot be imported" not in gp.console()


def test_asyncio_when_asked(tmp_path: Path) -> None:
    config = run_config(proxy=", event_loop: asyncio")
    with GatewayProcess(write_config(tmp_path, config)) as gp:
        assert _served_and_drained(gp) == "asyncio"
        assert "cannot be imported" not in gp.console()


def test_uvloop_missing_warns_and_runs_on_asyncio(tmp_path: Path) -> None:
    command = [sys.executable, "-c", NO_UVLOOP]
    with GatewayProcess(write_config(tmp_path, UV), command=command) as gp:
        assert _served_and_drained(gp) == "asyncio"
        out = gp.console()
        assert "WARNING" in out and "proxy.event_loop is uvloop, which cannot be imported" in out
        assert "pip install uvloop" in out


def test_unknown_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="event_loop"):
        parse_config({"proxy": {"event_loop": "trio"}})


SPAWN = """
import gateway.cli  # noqa: F401  (what `gateway run` sets before grpc is imported)
import asyncio, sys
import grpc, uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main() -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    done = asyncio.Event()

    async def load() -> None:  # grpc's threads busy while the loop spawns
        while not done.is_set():
            await stub.Check(health_pb2.HealthCheckRequest())

    tasks = [asyncio.ensure_future(load()) for _ in range(4)]
    crashed = 0
    for _ in range(int(sys.argv[1])):
        p = await asyncio.create_subprocess_exec("/bin/true", start_new_session=True)
        crashed += await p.wait() != 0
    done.set()
    await asyncio.gather(*tasks)
    await channel.close()
    await server.stop(0)
    print("crashed", crashed)

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""


def test_processes_spawned_on_uvloop_do_not_crash() -> None:
    """Replicas are spawned from the gateway's loop. With grpc's fork handlers armed (grpc's
    default), ~1 uvloop spawn in 13 died of SIGSEGV before its exec: the odds of none in 150
    are about 1 in 100,000."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", SPAWN, "150"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "crashed 0" in out.stdout, out.stdout + out.stderr[-2000:]


def test_fork_support_forced_on_runs_on_asyncio_with_a_warning(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true"}
    with GatewayProcess(write_config(tmp_path, UV), env=env) as gp:
        assert _served_and_drained(gp) == "asyncio"
        assert "GRPC_ENABLE_FORK_SUPPORT is on" in gp.console()


def _replica_environ(gp: GatewayProcess) -> list[bytes]:
    gp.wait_for(r"application 'text': (RUNNING)", 30)
    (pid,) = gp.replica_pids()
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_replicas_keep_the_users_fork_setting(tmp_path: Path) -> None:
    """The gateway turns grpc's fork handlers off for itself; a model's process gets what the
    user's environment says (nothing here: grpc's default), and a value the user set."""
    import os

    bare = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    with GatewayProcess(write_config(tmp_path, UV), env=bare) as gp:
        names = {v.split(b"=", 1)[0] for v in _replica_environ(gp)}
        assert b"GRPC_ENABLE_FORK_SUPPORT" not in names
        assert _served_and_drained(gp) == "uvloop"
    (tmp_path / "b").mkdir()
    chosen = {**bare, "GRPC_ENABLE_FORK_SUPPORT": "0"}
    with GatewayProcess(write_config(tmp_path / "b", UV), env=chosen) as gp:
        assert b"GRPC_ENABLE_FORK_SUPPORT=0" in _replica_environ(gp)
        assert _served_and_drained(gp) == "uvloop"


@pytest.mark.parametrize("value", [None, "", "on", "2", "y", "T", "yes", "1", "true", "enabled"])
def test_fork_support_counts_as_on_unless_grpc_reads_false(value: str | None) -> None:
    """grpc reads what it cannot parse as its default (armed): only its false values are off."""
    from gateway.event_loop import FORK_ENV, fork_support_on

    assert fork_support_on({} if value is None else {FORK_ENV: value})


@pytest.mark.parametrize("value", ["0", "f", "false", " False ", "n", "NO"])
def test_fork_support_off_for_grpcs_false_values(value: str) -> None:
    from gateway.event_loop import FORK_ENV, fork_support_on

    assert not fork_support_on({FORK_ENV: value})


@pytest.mark.parametrize("value", ["\xa0false", "\x1cfalse", "0\x85", "false\u3000"])
def test_fork_support_on_when_only_non_ascii_space_surrounds_false(value: str) -> None:
    """grpc strips ASCII whitespace only: around any other space it cannot read the value."""
    from gateway.event_loop import FORK_ENV, fork_support_on

    assert fork_support_on({FORK_ENV: value})
