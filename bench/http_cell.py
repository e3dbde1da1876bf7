"""The HTTP cell of `make bench`: OIP REST infer through the gateway's HTTP ingress, beside the
same model (`iris`, one external replica) over gRPC through the gateway and called directly;
and the gateway's gRPC throughput with the HTTP port idle and with REST load on it.

Load: h2load; gRPC over one HTTP/2 connection with `c` streams, REST over `c` HTTP/1.1
connections (one request at a time each, as HTTP/1.1 clients do). A cell counts only when every
call got HTTP 200; the gRPC status is checked by a few Python client calls before each target.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.cells import Settings
from bench.load import h2load, percentile
from bench.procs import Child, cpu_seconds
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.pb import grpc_predict_v2_pb2_grpc as pb_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"
REST = "/v2/models/iris/infer"
ROWS = [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3)]


def _request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="iris")
    t = req.inputs.add(name="features", datatype="FP32", shape=[len(ROWS), 4])
    t.contents.fp32_contents.extend(v for r in ROWS for v in r)
    return req


def write_bodies(work: Path) -> tuple[Path, Path]:
    msg = _request().SerializeToString()
    frame = work / "infer.frame"
    frame.write_bytes(struct.pack(">BI", 0, len(msg)) + msg)
    body = work / "infer.json"
    body.write_text(json.dumps({"inputs": [{"name": "features", "shape": [len(ROWS), 4],
                                            "datatype": "FP32", "data": [list(r) for r in ROWS]}]}))
    return frame, body


def verify_grpc(address: str, app: str | None) -> None:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        md = (("application", app),) if app else ()
        for _ in range(3):
            resp = stub.ModelInfer(_request(), metadata=md, timeout=10)
            assert len(resp.outputs) == 2, resp


def start(s: Settings, tmp: Path, env: dict[str, str]) -> tuple[list[Child], str, str, str]:
    """The iris replica and a gateway in front of it (gRPC and HTTP); their addresses."""
    rep = Child("iris replica", [sys.executable, "-m", "bench.iris_replica"],
                tmp / "iris-replica.log", env=env)
    children = [rep]
    rep_addr = "127.0.0.1:" + rep.wait_for(r"listening (\d+)").group(1)
    cfg = {"proxy": {"port": 0}, "admin": {"port": 0}, "http": {"enabled": True, "port": 0},
           "logging_config": {"logs_dir": str(tmp / "http-gateway-logs"),
                              "disable_access_log": False},
           "applications": [{"name": "classifier", "deployments": [{
               "name": "Iris", "targets": [rep_addr], "max_ongoing_requests": 1000,
               "max_queued_requests": 10000}]}]}
    path = tmp / "http-gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gw = Child("gateway (http)", [sys.executable, "-m", "gateway.cli", "run", str(path)],
               tmp / "http-gateway.log", env=env)
    children.append(gw)
    grpc_addr = gw.wait_for(r"serving gRPC on (\S+)").group(1)
    http_addr = gw.wait_for(r"serving HTTP on http://(\S+)").group(1)
    gw.wait_for(r"application 'classifier': RUNNING")
    return children, rep_addr, grpc_addr, http_addr


def _cell(name: str, address: str, conc: int, s: Settings, body: Path, work: Path,
          gw_pid: int | None, rest: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"path": REST if rest else INFER, "h1_json": rest}
    if s.smoke:
        h2load(address, conc, body, "classifier", work, calls=s.warmup_calls, **kw)
        n = s.measure_calls
    else:
        warm = h2load(address, conc, body, "classifier", work, duration_s=s.warmup_s, **kw)
        n = max(200, int(warm.calls_per_s * s.measure_s))
    cpu0 = cpu_seconds([gw_pid]) if gw_pid else 0.0
    r = h2load(address, conc, body, "classifier", work, calls=n, **kw)
    cpu = (cpu_seconds([gw_pid]) - cpu0) if gw_pid else 0.0
    return {"target": name, "concurrency": conc, "calls": r.calls, "ok": r.status_2xx == r.calls
            and r.failed == 0 and r.errored == 0 and r.calls == n,
            "calls_per_s": r.calls_per_s, "p50_ms": percentile(r.latencies_us, 0.50),
            "p99_ms": percentile(r.latencies_us, 0.99),
            "gateway_cpu_us_per_call": (cpu / r.calls * 1e6) if gw_pid and r.calls else None}


def grpc_under_http_load(s: Settings, grpc_addr: str, http_addr: str, frame: Path,
                         body: Path, work: Path, gw_pid: int) -> dict[str, Any]:
    """gRPC calls/s through the gateway while REST load runs on its HTTP port (bounded)."""
    conc = 16
    seconds = 2.0 if s.smoke else s.measure_s + 2
    load: dict[str, Any] = {}

    def rest_load() -> None:
        try:
            load["r"] = h2load(http_addr, conc, body, "classifier", work,
                               duration_s=seconds, path=REST, h1_json=True,
                               log_name="h2load-http-bg.log")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            load["error"] = str(e)[-500:]

    t = threading.Thread(target=rest_load)
    t.start()
    time.sleep(0.3)  # the REST load is running
    cell = _cell("gateway gRPC, HTTP under load", grpc_addr, conc, s, frame, work, gw_pid, False)
    t.join(seconds + 60)
    bg = load.get("r")
    cell["http_background_calls_per_s"] = bg.calls_per_s if bg is not None else None
    return cell


def run_http_cells(s: Settings, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    work = tmp / "http-work"
    work.mkdir(exist_ok=True)
    frame, body = write_bodies(work)
    children, rep_addr, grpc_addr, http_addr = start(s, tmp, env)
    cells: list[dict[str, Any]] = []
    try:
        verify_grpc(rep_addr, None)
        verify_grpc(grpc_addr, "classifier")
        gw_pid = children[1].pid
        concs = (1, 16) if s.smoke else s.concurrencies
        for conc in concs:
            for name, addr, pid, rest in (
                ("direct gRPC", rep_addr, None, False),
                ("gateway gRPC", grpc_addr, gw_pid, False),
                ("gateway HTTP (OIP REST)", http_addr, gw_pid, True),
            ):
                b = body if rest else frame
                cell = _cell(name, addr, conc, s, b, work, pid, rest)
                cells.append(cell)
                print(f"  http-cell {name:26} c={conc:<3} {cell['calls_per_s']:8.0f} calls/s"
                      f"  p50 {cell['p50_ms']:.3f} ms  ok={cell['ok']}", file=sys.stderr,
                      flush=True)
        cells.append(grpc_under_http_load(s, grpc_addr, http_addr, frame, body, work, gw_pid))
    finally:
        for c in reversed(children):
            c.stop()
    return {"cells": cells, "rest_body_bytes": body.stat().st_size}


def render_http(result: dict[str, Any]) -> list[str]:
    lines = ["", "## HTTP cell: the iris model, OIP REST vs gRPC (issue 13)", "",
             "| target | c | calls/s | p50 ms | p99 ms | gateway CPU us/call | ok |",
             "|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        cpu = c["gateway_cpu_us_per_call"]
        lines.append(f"| {c['target']} | {c['concurrency']} | {c['calls_per_s']:.0f} | "
                     f"{c['p50_ms']:.3f} | {c['p99_ms']:.3f} | "
                     f"{'-' if cpu is None else f'{cpu:.0f}'} | {c['ok']} |")
    last = result["cells"][-1]
    bg = last.get("http_background_calls_per_s")
    if bg is not None:
        lines += ["", f"Last row: gRPC through the gateway while h2load sent {bg:.0f} REST "
                      "calls/s to its HTTP port (c=16); compare with `gateway gRPC` c=16."]
    return lines
