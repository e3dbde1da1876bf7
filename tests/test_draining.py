"""Draining a real `gateway run` under load: SIGTERM (or `gateway shutdown`) refuses new calls,
lets every accepted call finish, reports DRAINING, then stops replicas and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.pb import ray_serve_pb2, ray_serve_pb2_grpc, text_model_pb2, text_model_pb2_grpc
from tests.ops_support import REPO, GatewayProcess, write_config

CONFIG = """
proxy: {host: 127.0.0.1, port: 0, graceful_shutdown_timeout_s: 15}
admin: {port: 0}
metrics: {prometheus: {port: 0}}
logging_config: {logs_dir: LOGS, encoding: JSON}
applications:
  - name: text
    deployments:
      - {name: TextModel, import_path: "examples.models:TextModel", num_replicas: 2,
         max_ongoing_requests: 8, graceful_shutdown_timeout_s: 15}
"""
CLIENTS = 6
CALL_SLEEP_S = 0.2
# Long enough that the drain outlasts the checks made from outside (CLI start-ups are slow
# on a loaded machine); the tests wait for it to be in flight instead of sleeping.
LONG_CALL_S = 5.0


def start(tmp_path: Path) -> GatewayProcess:
    return GatewayProcess(write_config(tmp_path, CONFIG))


def ongoing(gp: GatewayProcess) -> int:
    """The gateway's own count of calls in flight (its Prometheus gauge)."""
    url = gp.wait_for(r"metrics on (\S+)", 5)
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("ray_serve_num_ongoing_grpc_requests"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def wait_ongoing(gp: GatewayProcess, n: int, timeout: float = 20) -> None:
    """Wait (bounded) until the gateway has at least `n` calls in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ongoing(gp) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"never {n} call(s) in flight")


class Load:
    """Client threads calling until told to stop; every outcome is kept."""

    def __init__(self, address: str, clients: int = CLIENTS, retry_after_s: float = 0.05,
                 sleep_s: float = CALL_SLEEP_S) -> None:
        self.address = address
        self.retry_after_s = retry_after_s
        self.sleep_s = sleep_s
        self.ok: list[str] = []
        self.refused: list[str] = []
        self.lost: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, n: int) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = text_model_pb2_grpc.TextModelStub(ch)
            i = 0
            deadline = time.monotonic() + 60
            while not self.stop.is_set() and time.monotonic() < deadline and i < 500:
                rid = f"load-{n}-{i}"
                i += 1
                self.call(stub, rid, self.sleep_s)

    def call(self, stub: Any, rid: str, sleep_s: float) -> None:
        try:
            stub.Predict(text_model_pb2.PredictRequest(text="good", sleep_s=sleep_s),
                         metadata=(("x-request-id", rid),), timeout=30)
            with self._lock:
                self.ok.append(rid)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
            # Not accepted: the gateway said it is draining, or no longer listens.
            refused = code is grpc.StatusCode.UNAVAILABLE and (
                "draining" in details or "connect" in details.lower()
            )
            with self._lock:
                (self.refused if refused else self.lost).append(f"{rid}: {code.name} {details}")
            if refused:
                time.sleep(self.retry_after_s)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def access_lines(logs: Path) -> list[dict[str, Any]]:
    out = []
    for line in (logs / "gateway.log").read_text().splitlines():
        rec = json.loads(line)
        if rec["logger"] == "gateway.access":
            out.append(rec)
    return out


def replica_pids(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children(recursive=True)
            if "gateway.runtime.replica" in " ".join(c.cmdline())]


def gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
            return True
        time.sleep(0.05)
    return False


def admin_status(address: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "-a", address],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = yaml.safe_load(out.stdout)
    return doc


def test_sigterm_drains_under_load_without_losing_accepted_calls(tmp_path: Path) -> None:
    gp = start(tmp_path)
    load = Load(gp.address)
    long_result: list[str] = []
    try:
        pids = replica_pids(gp.proc.pid)
        assert len(pids) == 2
        load.start()
        time.sleep(1.0)
        # One long call, so the drain lasts long enough to look at it from outside.
        with grpc.insecure_channel(gp.address) as ch:
            stub = text_model_pb2_grpc.TextModelStub(ch)
            longer = threading.Thread(target=lambda: long_result.append(
                stub.Predict(text_model_pb2.PredictRequest(text="good", sleep_s=LONG_CALL_S),
                             metadata=(("x-request-id", "long-1"),), timeout=30).label))
            longer.start()
            # Each load client has at most one call in flight: one more is the long call.
            wait_ongoing(gp, CLIENTS + 1)
            gp.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
            ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                time.sleep(0.02)

            # DRAINING, seen from every side.
            assert list(admin_status(gp.admin)["proxies"].values()) == ["DRAINING"]
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                ray_serve_pb2_grpc.RayServeAPIServiceStub(ch).Healthz(
                    ray_serve_pb2.HealthzRequest(), timeout=5)
                raise AssertionError("Healthz answered while draining")
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            try:
                stub.Predict(text_model_pb2.PredictRequest(text="late"), timeout=5)
                raise AssertionError("a new call was accepted while draining")
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                assert "draining" in (e.details() or "")  # type: ignore[attr-defined]
            longer.join(30)
        rc = gp.wait(60)
        load.join()
    finally:
        load.stop.set()
        gp.kill()

    assert rc == 0, gp.console()
    assert long_result == ["positive"]
    assert load.lost == [], load.lost
    assert len(load.ok) >= CLIENTS * 3 and load.refused
    assert gone(pids, 10), "replicas outlived the gateway"
    # The gateway's access log agrees: every call it finished OK is one the client got.
    lines = access_lines(tmp_path / "logs")
    ok_ids = {r["request_id"] for r in lines if r["status"] == "OK"}
    assert ok_ids == {*load.ok, "long-1"}
    assert {r["status"] for r in lines} <= {"OK", "UNAVAILABLE"}
    console = gp.console()
    assert "draining" in console and "stopped" in console


def test_shutdown_command_drains_and_exits_zero(tmp_path: Path) -> None:
    gp = start(tmp_path)
    result: list[str] = []
    try:
        pids = replica_pids(gp.proc.pid)
        with grpc.insecure_channel(gp.address) as ch:
            stub = text_model_pb2_grpc.TextModelStub(ch)
            t = threading.Thread(target=lambda: result.append(stub.Predict(
                text_model_pb2.PredictRequest(text="good", sleep_s=LONG_CALL_S),
                timeout=30).label))
            t.start()
            # In flight before the CLI (slow to start on a loaded machine) asks to shut down.
            wait_ongoing(gp, 1)
            out = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "shutdown", "--address", gp.admin],
                cwd=REPO, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith("draining: 1 call(s) in flight")
            t.join(30)
        assert gp.wait(60) == 0, gp.console()
    finally:
        gp.kill()
    assert result == ["positive"]
    assert gone(pids, 10)


def test_clients_retrying_at_once_never_see_cancelled(tmp_path: Path) -> None:
    """Clients that retry a refused call at once keep calls arriving while the listener shuts.

    grpc core cancels (CANCELLED) the calls it has not handed to the gateway when its
    shutdown begins; the gateway holds refusals until its clients are quiet, so none is sent
    into the shutdown and every call ends OK or UNAVAILABLE.
    """
    gp = start(tmp_path)
    load = Load(gp.address, clients=12, retry_after_s=0.0, sleep_s=0.0)
    try:
        load.start()
        wait_ongoing(gp, 1)
        time.sleep(0.5)
        gp.proc.send_signal(signal.SIGTERM)
        rc = gp.wait(60)
        load.join()
    finally:
        load.stop.set()
        gp.kill()
    assert rc == 0, gp.console()
    assert load.lost == [], load.lost
    assert load.ok and load.refused


def test_retrying_clients_never_see_cancelled_when_a_long_call_uses_up_the_grace(
        tmp_path: Path) -> None:
    """One call outlasts the whole grace (1 s), so the drain ends with no time left; refused
    calls are still held until their clients are quiet before the listener shuts (at most
    QUIET_MAX_S past the grace), so none of them is CANCELLED by grpc core."""
    gp = GatewayProcess(write_config(tmp_path, CONFIG.replace(
        "port: 0, graceful_shutdown_timeout_s: 15", "port: 0, graceful_shutdown_timeout_s: 1")))
    long_call = Load(gp.address, clients=1, sleep_s=LONG_CALL_S)  # its end is not at issue
    load = Load(gp.address, clients=6, retry_after_s=0.0, sleep_s=0.01)
    try:
        long_call.start()
        wait_ongoing(gp, 1)
        load.start()
        time.sleep(0.5)
        gp.proc.send_signal(signal.SIGTERM)
        rc = gp.wait(60)
        load.join()
        long_call.join()
    finally:
        load.stop.set()
        long_call.stop.set()
        gp.kill()
    assert rc == 0, gp.console()
    assert load.lost == [], load.lost
    assert load.ok and load.refused
