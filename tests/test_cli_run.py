"""`gateway run` as a real process: serves, stops on Ctrl-C or SIGTERM, leaves no orphans."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from gateway.pb import text_model_pb2, text_model_pb2_grpc
from tests.ops_support import REPO, GatewayProcess, run_config, write_config

TWO = run_config(replicas=2)


def start(tmp_path: Path, config: str = TWO, new_session: bool = False) -> GatewayProcess:
    return GatewayProcess(write_config(tmp_path, config), new_session=new_session)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and
                 psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


@pytest.fixture
def gateway_proc(tmp_path: Path) -> Iterator[GatewayProcess]:
    with start(tmp_path) as gp:
        yield gp


def call(addr: str) -> str:
    with grpc.insecure_channel(addr) as ch:
        r = text_model_pb2_grpc.TextModelStub(ch).Predict(
            text_model_pb2.PredictRequest(text="good"), timeout=10
        )
    return str(r.label)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_and_stops_cleanly(gateway_proc: GatewayProcess, sig: signal.Signals) -> None:
    gp = gateway_proc
    assert call(gp.address) == "positive"
    pids = gp.replica_pids()
    assert len(pids) == 2
    gp.proc.send_signal(sig)
    assert gp.wait(30) == 0, gp.console()
    assert "stopped" in gp.console()
    assert wait_gone(pids, 10) == []


def test_replicas_exit_when_gateway_is_killed(gateway_proc: GatewayProcess) -> None:
    pids = gateway_proc.replica_pids()
    assert len(pids) == 2
    os.kill(gateway_proc.pid, signal.SIGKILL)
    gateway_proc.wait(30)
    assert wait_gone(pids, 10) == [], "replica processes outlived the gateway"


def test_sigterm_to_the_process_group_lets_the_gateway_drain(tmp_path: Path) -> None:
    """systemd's KillMode=control-group or `kill -TERM -PGID` signal every process: the
    replicas leave stopping to the gateway, so a call in flight gets the gateway's grace
    (20 s), not the replica's own (here 0.5 s)."""
    config = run_config(deployment=", graceful_shutdown_timeout_s: 0.5")
    with start(tmp_path, config, new_session=True) as gp:
        addr = gp.address
        pids = gp.replica_pids()
        assert len(pids) == 1
        result: list[str] = []

        def long_call() -> None:
            with grpc.insecure_channel(addr) as ch:
                try:
                    r = text_model_pb2_grpc.TextModelStub(ch).Predict(
                        text_model_pb2.PredictRequest(text="good", sleep_s=2.5), timeout=30)
                    result.append(r.label)
                except grpc.RpcError as e:
                    result.append(f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]

        import threading

        t = threading.Thread(target=long_call)
        t.start()
        time.sleep(0.8)
        os.killpg(gp.pid, signal.SIGTERM)
        t.join(30)
        rc = gp.wait(30)
        out = gp.console()
        assert result == ["positive"], out
        assert rc == 0, out
        assert "Traceback" not in out
        assert wait_gone(pids, 10) == []


def test_bad_config_exits_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("applications: [{name: a, deployments: [{name: D, num_replicas: -1}]}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "applications[0].deployments[0].num_replicas" in out.stderr
    assert "Traceback" not in out.stderr


def start_loading(tmp_path: Path, import_path: str,
                  new_session: bool = False) -> tuple[GatewayProcess, int]:
    """`gateway run` whose one replica is still loading its model: (gateway, replica pid)."""
    gp = GatewayProcess(write_config(tmp_path, run_config(import_path=import_path)),
                        new_session=new_session, wait_serving=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = gp.replica_pids()
        # Its log file exists once its signal guard is in place (gateway/runtime/replica.py
        # starts the guard, then logging, then loads the model): a slow start-up on a loaded
        # machine must not take the default SIGINT for the guard's.
        if pids and list((tmp_path / "logs").glob("replica_*.log")):
            return gp, pids[0]
        time.sleep(0.05)
    gp.kill()
    raise AssertionError("no replica process started:\n" + gp.console())


def everything_written(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*")
                     if p.is_file() and p.suffix in (".txt", ".log", ".json", ""))


def test_replica_loading_its_model_exits_when_gateway_is_killed(tmp_path: Path) -> None:
    """The model takes 20 s to load; the replica watches its gateway from its first moment,
    not only once it serves."""
    gp, replica = start_loading(tmp_path, "tests.control_models:VerySlowStart")
    try:
        time.sleep(1.0)  # inside the model's constructor now
        os.kill(gp.pid, signal.SIGKILL)
        gp.wait(30)
        assert wait_gone([replica], 5) == [], "a loading replica outlived its gateway"
    finally:
        gp.kill()
        with contextlib.suppress(OSError):
            os.kill(replica, signal.SIGKILL)


def test_sigint_while_the_model_loads_is_left_to_the_gateway(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) reaching a replica still in its model's constructor: no traceback,
    the replica keeps loading; a process-group SIGINT stops the gateway, which stops it."""
    gp, replica = start_loading(tmp_path, "tests.control_models:VerySlowStart",
                                new_session=True)
    try:
        time.sleep(1.0)
        os.kill(replica, signal.SIGINT)
        time.sleep(1.0)
        assert wait_gone([replica], 0.1) == [replica], "SIGINT killed the loading replica"
        os.killpg(gp.pid, signal.SIGINT)
        assert gp.wait(30) == 0
        assert wait_gone([replica], 10) == []
        written = everything_written(tmp_path) + gp.console()
        assert "KeyboardInterrupt" not in written, written
        assert "Traceback" not in written, written
    finally:
        gp.kill()
        with contextlib.suppress(OSError):
            os.kill(replica, signal.SIGKILL)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_child_processes_of_the_model_end_with_their_replica(tmp_path: Path, how: str) -> None:
    gp = start(tmp_path, run_config(import_path="tests.control_models:StartsAChild"))
    children: list[int] = []
    try:
        (replica,) = gp.replica_pids()
        children = [c.pid for c in psutil.Process(replica).children()]
        assert children, "the model started no child"
        if how == "stop":
            gp.proc.send_signal(signal.SIGTERM)
            assert gp.wait(30) == 0
        else:
            os.kill(gp.pid, signal.SIGKILL)
            gp.wait(30)
        assert wait_gone([replica], 10) == []
        assert wait_gone(children, 10) == [], "the model's child outlived its replica"
    finally:
        gp.kill()
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_repeated_sigterm_while_stopping_still_exits_zero(tmp_path: Path) -> None:
    """SIGTERM again and again (a supervisor insisting) with no grace: the stop that has
    begun finishes and the exit code stays 0, however late the signals come."""
    config = run_config(replicas=2, proxy=", graceful_shutdown_timeout_s: 0")
    with start(tmp_path, config) as gp:
        deadline = time.monotonic() + 30
        while gp.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                gp.proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)
        assert gp.wait(30) == 0, gp.console()
