"""`gateway run` as a real process: serves, stops on Ctrl-C or SIGTERM, leaves no orphans."""

from __future__ import annotations

import contextlib
import os
import re
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

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
proxy: {host: 127.0.0.1, port: 0}
admin: {port: 0}
metrics: {prometheus: {port: 0}}
logging_config: {logs_dir: LOGS}
applications:
  - name: text
    deployments:
      - {name: TextModel, import_path: "examples.models:TextModel", num_replicas: 2}
"""


def start(tmp_path: Path, config: str = CONFIG,
          new_session: bool = False) -> tuple[subprocess.Popen[str], str]:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(config.replace("LOGS", str(tmp_path / "logs")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", str(cfg)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"serving gRPC on (\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("gateway did not start")


def replica_pids(proc: subprocess.Popen[str]) -> list[int]:
    return [
        c.pid for c in psutil.Process(proc.pid).children(recursive=True)
        if "gateway.runtime.replica" in " ".join(c.cmdline())
    ]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and
                 psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


@pytest.fixture
def gateway_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, addr = start(tmp_path)
    try:
        yield proc, addr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def call(addr: str) -> str:
    with grpc.insecure_channel(addr) as ch:
        r = text_model_pb2_grpc.TextModelStub(ch).Predict(
            text_model_pb2.PredictRequest(text="good"), timeout=10
        )
    return str(r.label)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_and_stops_cleanly(
    gateway_proc: tuple[subprocess.Popen[str], str], sig: signal.Signals
) -> None:
    proc, addr = gateway_proc
    assert call(addr) == "positive"
    pids = replica_pids(proc)
    assert len(pids) == 2
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert wait_gone(pids, 10) == []


def test_replicas_exit_when_gateway_is_killed(
    gateway_proc: tuple[subprocess.Popen[str], str],
) -> None:
    proc, _ = gateway_proc
    pids = replica_pids(proc)
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_gone(pids, 10) == [], "replica processes outlived the gateway"


def test_sigterm_to_the_process_group_lets_the_gateway_drain(tmp_path: Path) -> None:
    """systemd's KillMode=control-group or `kill -TERM -PGID` signal every process: the
    replicas leave stopping to the gateway, so a call in flight gets the gateway's grace
    (20 s), not the replica's own (here 0.5 s)."""
    config = CONFIG.replace("num_replicas: 2}", "num_replicas: 1,\n"
                            "         graceful_shutdown_timeout_s: 0.5}")
    proc, addr = start(tmp_path, config, new_session=True)
    try:
        pids = replica_pids(proc)
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
        os.killpg(proc.pid, signal.SIGTERM)
        t.join(30)
        out, _ = proc.communicate(timeout=30)
        assert result == ["positive"], out
        assert proc.returncode == 0, out
        assert "Traceback" not in out
        assert wait_gone(pids, 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def one_replica(import_path: str) -> str:
    return CONFIG.replace('"examples.models:TextModel", num_replicas: 2',
                          f'"{import_path}", num_replicas: 1')


def start_loading(tmp_path: Path, import_path: str,
                  new_session: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """`gateway run` whose one replica is still loading its model: (gateway, replica pid)."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(one_replica(import_path).replace("LOGS", str(tmp_path / "logs")))
    with open(tmp_path / "console.txt", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(cfg)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=new_session)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            pids = [c.pid for c in psutil.Process(proc.pid).children()
                    if "gateway.runtime.replica" in " ".join(c.cmdline())]
            if pids:
                return proc, pids[0]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("no replica process started")


def everything_written(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*")
                     if p.is_file() and p.suffix in (".txt", ".log", ".json", ""))


def test_replica_loading_its_model_exits_when_gateway_is_killed(tmp_path: Path) -> None:
    """The model takes 20 s to load; the replica watches its gateway from its first moment,
    not only once it serves."""
    proc, replica = start_loading(tmp_path, "tests.control_models:VerySlowStart")
    try:
        time.sleep(1.0)  # inside the model's constructor now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_gone([replica], 5) == [], "a loading replica outlived its gateway"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.kill(replica, signal.SIGKILL)


def test_sigint_while_the_model_loads_is_left_to_the_gateway(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) reaching a replica still in its model's constructor: no traceback,
    the replica keeps loading; a process-group SIGINT stops the gateway, which stops it."""
    proc, replica = start_loading(tmp_path, "tests.control_models:VerySlowStart",
                                  new_session=True)
    try:
        time.sleep(1.0)
        os.kill(replica, signal.SIGINT)
        time.sleep(1.0)
        assert wait_gone([replica], 0.1) == [replica], "SIGINT killed the loading replica"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        assert wait_gone([replica], 10) == []
        written = everything_written(tmp_path)
        assert "KeyboardInterrupt" not in written, written
        assert "Traceback" not in written, written
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.kill(replica, signal.SIGKILL)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_child_processes_of_the_model_end_with_their_replica(tmp_path: Path, how: str) -> None:
    proc, _ = start(tmp_path, one_replica("tests.control_models:StartsAChild"))
    children: list[int] = []
    try:
        (replica,) = replica_pids(proc)
        children = [c.pid for c in psutil.Process(replica).children()]
        assert children, "the model started no child"
        if how == "stop":
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            assert proc.returncode == 0
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert wait_gone([replica], 10) == []
        assert wait_gone(children, 10) == [], "the model's child outlived its replica"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_repeated_sigterm_while_stopping_still_exits_zero(tmp_path: Path) -> None:
    """SIGTERM again and again (a supervisor insisting) with no grace: the stop that has
    begun finishes and the exit code stays 0, however late the signals come."""
    config = CONFIG.replace("proxy: {host: 127.0.0.1, port: 0}",
                            "proxy: {host: 127.0.0.1, port: 0, graceful_shutdown_timeout_s: 0}")
    proc, _ = start(tmp_path, config)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
