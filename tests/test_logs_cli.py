"""Logs of a foreground `gateway run`: replica output on the console prefixed with where it came
from, and memray profiles of the gateway and every local replica."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import grpc

from gateway.pb import text_model_pb2, text_model_pb2_grpc
from tests.ops_support import GatewayProcess, write_config

CONFIG = """
proxy: {host: 127.0.0.1, port: 0, graceful_shutdown_timeout_s: 5}
admin: {port: 0}
metrics: {prometheus: {port: 0}}
logging_config: {logs_dir: LOGS, encoding: JSON}
applications:
  - name: text
    deployments:
      - {name: Chatty, import_path: "tests.ops_support:Chatty", num_replicas: 1}
"""


def call(addr: str, rid: str) -> text_model_pb2.PredictResponse:
    with grpc.insecure_channel(addr) as ch:
        resp: text_model_pb2.PredictResponse = text_model_pb2_grpc.TextModelStub(ch).Predict(
            text_model_pb2.PredictRequest(text="hello"), timeout=10,
            metadata=(("x-request-id", rid),),
        )
    return resp


def test_replica_output_is_prefixed_on_the_console(tmp_path: Path) -> None:
    gp = GatewayProcess(write_config(tmp_path, CONFIG))
    try:
        resp = call(gp.address, "console-req-1")
        gp.wait_for(r"(\(ServeReplica:text#Chatty pid=\d+\) .*printed by the model: hello)", 10)
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait(30) == 0, gp.console()
    finally:
        gp.kill()
    console = gp.console()
    prefixed = [s for s in console.splitlines() if s.startswith("(ServeReplica:text#Chatty pid=")]
    pid = int(re.search(r"pid=(\d+)", prefixed[0]).group(1))  # type: ignore[union-attr]
    assert pid != gp.proc.pid
    texts = " | ".join(prefixed)
    # The replica's own logs and prints come with the request id; its access lines stay in
    # its file (the gateway's console already has one line per call).
    assert "hello from the model: hello" in texts and "console-req-1" in texts
    assert "printed by the model: hello" in texts
    assert not any("/demo.text.TextModel/Predict OK" in s for s in prefixed)
    # The gateway's own console lines are in its encoding (JSON), with its access line.
    access = [json.loads(s) for s in console.splitlines()
              if s.startswith("{") and '"gateway.access"' in s]
    assert [a["request_id"] for a in access] == ["console-req-1"]
    # And everything the replica printed is in its file too.
    files = list((tmp_path / "logs").glob("replica_text_Chatty_*.log"))
    assert len(files) == 1
    records = [json.loads(s) for s in files[0].read_text().splitlines()]
    assert {r["replica"] for r in records} == {resp.replica}
    assert any(r["message"] == "printed by the model: hello" for r in records)


def test_memory_profiling_writes_memray_files(tmp_path: Path) -> None:
    import memray  # the optional extra "memray"; `make venv` installs it
    env = dict(os.environ, GATEWAY_ENABLE_MEMORY_PROFILING="1")
    gp = GatewayProcess(write_config(tmp_path, CONFIG), env=env)
    try:
        call(gp.address, "memray-req-1")
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait(60) == 0, gp.console()
    finally:
        gp.kill()
    logs = tmp_path / "logs"
    deadline = time.monotonic() + 10
    while len(list(logs.glob("memray_*.bin"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    gateway_bins = list(logs.glob("memray_gateway_*.bin"))
    replica_bins = list(logs.glob("memray_replica_text_Chatty_*.bin"))
    assert len(gateway_bins) == 1 and len(replica_bins) == 1, list(logs.iterdir())
    assert gateway_bins[0].name == f"memray_gateway_{gp.proc.pid}.bin"
    for path in (*gateway_bins, *replica_bins):
        reader = memray.FileReader(str(path))
        pid = int(path.stem.rsplit("_", 1)[1])
        assert reader.metadata.pid == pid
        assert reader.metadata.total_allocations > 0
