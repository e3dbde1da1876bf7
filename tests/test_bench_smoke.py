"""`make bench` cannot rot: the smoke run measures every cell, and its gRPC-OK check bites.

No thresholds here (performance is judged by `make bench`, not by tests); these tests check that
the harness produces numbers for each cell and that every counted call was a real gRPC OK.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from bench import cells as bench_cells
from bench import load, procs, report, unknown_cell
from bench.frames import write_echo_frame
from gateway.pb import bench_pb2, bench_pb2_grpc

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None,
                                reason="h2load (Debian nghttp2-client) is not installed")


@pytest.mark.timeout(300)
def test_smoke_run_measures_every_cell(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [js] = tmp_path.glob("*-smoke.json")
    [md] = tmp_path.glob("*-smoke.md")
    result = json.loads(js.read_text())
    has_nginx = procs.nginx_binary() is not None
    assert result["nginx"] is has_nginx
    if not has_nginx:
        assert any("nginx not found" in n for n in result["notes"])
    expected = {(k, t, c) for k in procs.KINDS for t in report.TARGETS
                for c in (1, 16, 64) if t != "nginx" or has_nginx}
    expected |= {(procs.MUX_KIND, "gateway", c) for c in (1, 16, 64)}
    # Issue 17: the external direct, gateway and minimal proxy again, on a method the gateway
    # cannot know (/bench.Unlisted/Echo).
    expected |= {("external", n, c) for n in unknown_cell.NAMES for c in (1, 16, 64)}
    cells = {(c["kind"], c["target"], c["concurrency"]): c for c in result["cells"]}
    assert set(cells) == expected
    # The HTTP cell: the iris model over REST and gRPC through the gateway, and direct.
    http = {(c["target"], c["concurrency"]): c for c in result["http"]["cells"]}
    assert set(http) == {(t, c) for t in ("direct gRPC", "gateway gRPC",
                                          "gateway HTTP (OIP REST)") for c in (1, 16)} | {
        ("gateway gRPC, HTTP under load", 16)}
    for key, c in http.items():
        assert c["ok"] and c["calls_per_s"] > 0 and 0 < c["p50_ms"] <= c["p99_ms"], (key, c)
        assert (c["gateway_cpu_us_per_call"] is None) is (key[0] == "direct gRPC"), key
    assert http["gateway gRPC, HTTP under load", 16]["http_background_calls_per_s"] > 0
    assert "## HTTP cell" in md.read_text()
    for key, c in cells.items():
        assert c["grpc_ok"], (key, c["problems"])
        assert c["problems"] == []
        assert c["calls"] > 0 and c["calls_per_s"] > 0, key
        assert 0 < c["p50_ms"] <= c["p99_ms"], key
        assert c["latency_samples"] == c["calls"], key
        assert c["replica_cpu_us_per_call"] >= 0, key
        if key[0] == procs.MUX_KIND:  # no direct cell: compared with the plain gateway
            assert c["calls_per_s_vs_local_gateway"] > 0
        elif key[1].startswith("direct"):
            assert c["proxy_cpu_us_per_call"] is None
            assert c["calls_per_s_vs_direct"] > 0
            assert (c["calls_per_s_vs_direct"] == 1.0) is (key[1] == "direct")
        else:
            assert c["proxy_cpu_us_per_call"] is not None and c["proxy_cpu_us_per_call"] >= 0
            assert c["calls_per_s_vs_direct"] > 0
        # The call-by-call checks that ran (not only HTTP 200).
        assert any("replica served exactly" in x for x in c["checks"]), key
        assert any("echo message" in x for x in c["checks"]), key
        if key[1] in ("gateway", "gateway+records", "gateway (unknown method)"):
            assert any("gateway metrics" in x for x in c["checks"]), key
        if key[1] in unknown_cell.NAMES:
            assert c["calls_per_s_vs_known"] > 0, key
            assert any("of /bench.Unlisted/Echo" in x for x in c["checks"]), key
        if key[1] == "gateway (unknown method)":
            assert any("a method it does not know" in x for x in c["checks"]), key
        if key[1] == "nginx":
            assert any("grpc-status 0" in x for x in c["checks"]), key
    mem = result["memory"]["points"]
    assert [p["calls"] >= want for p, want in zip(mem, (1_000, 2_500), strict=True)] == [True] * 2
    assert mem[0]["calls"] == 1_000  # a fresh gateway: the first figure is at exactly 1k
    assert all(p["rss_mb"] > 0 for p in mem)
    features = result["features"]
    assert features["gateway"]["metrics"] == "on"
    assert features["gateway-telemetry-off"]["metrics"] == "off"
    assert features["gateway-telemetry-off"]["access_log"].startswith("off")
    # One access line per call, the unknown method's included (and not its warning line).
    lines, calls = features["gateway"]["access_log"].split(" lines for ")
    assert f"{lines} calls" == calls, features["gateway"]
    assert "prediction_records" in features["gateway+records"]
    # The paired ratios: every pair the targets compare, each call checked gRPC OK.
    paired = {r["name"]: r for r in result["paired"]}
    assert set(paired) == {
        "external, default vs minimal proxy", "external, telemetry on vs off",
        "local, telemetry on vs off", "local, default vs direct", "local, records 100% vs direct",
        "external, unknown vs known method", "external, equal load",
        "external, event loop uvloop vs asyncio",
        "external, uvloop gateway vs minimal proxy on uvloop"}
    # The gateways ran on the loop their config names (proxy.event_loop).
    assert features["gateway"]["event_loop"] == "asyncio"
    assert features["gateway-uvloop"]["event_loop"] == "uvloop"
    for name, r in paired.items():
        assert r["ok"] and r["calls_per_s_ratio"] > 0, (name, r)
        assert r["a_replica_cpu_us"] > 0 and r["b_replica_cpu_us"] > 0, name
    assert paired["external, equal load"]["rps"] >= 20
    assert paired["external, default vs minimal proxy"]["rps"] is None
    table = md.read_text()
    assert "## Paired ratios" in table
    assert table in proc.stdout
    assert "| gateway | 16 |" in table and "Issue 6 targets" in table
    assert "## multiplexed models" in table
    assert "## Methods the gateway does not know" in table
    row = next(ln for ln in table.splitlines() if unknown_cell.SUMMARY_LABEL in ln)
    assert row.startswith(f"| {unknown_cell.SUMMARY_LABEL} | >= 0.85 | ") and "| - |" not in row
    # Everything the harness started is gone.
    for name, pid in result["processes"].items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", name


class _Failing(bench_pb2_grpc.EchoServicer):
    """Answers HTTP 200 with grpc-status UNAVAILABLE: what h2load alone would count as success."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def Echo(self, request: bench_pb2.EchoMessage, context: Any) -> bench_pb2.EchoMessage:
        with self.lock:
            self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "replica says no")
        raise AssertionError("unreachable")

    def Stats(self, request: bench_pb2.StatsRequest, context: Any) -> bench_pb2.StatsReply:
        return bench_pb2.StatsReply(calls=self.calls)


@pytest.fixture
def failing_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    bench_pb2_grpc.add_EchoServicer_to_server(_Failing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_http_200_with_grpc_error_is_not_counted_ok(failing_server: str, tmp_path: Path) -> None:
    frame, message = write_echo_frame(tmp_path / "echo.frame")
    target = bench_cells.Target("external", "direct", failing_server, failing_server, os.getpid(),
                              lambda: [])
    clients = load.Clients()
    try:
        cell = bench_cells.run_cell(target, 4, bench_cells.SMOKE, frame, message, clients, tmp_path)
    finally:
        clients.close()
    assert cell["grpc_ok"] is False
    problems = " | ".join(cell["problems"])
    assert "UNAVAILABLE" in problems  # the Python client read the trailers
    assert "response DATA 0 B" in problems  # every h2load "success" was trailers-only
