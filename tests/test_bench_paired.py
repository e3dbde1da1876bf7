"""bench/paired.py: pairs measured in alternation, with the same gRPC-OK check as the cells.

Real servers and the real h2load; no thresholds (figures are judged by `make bench`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.frames import write_echo_frame
from bench.load import h2load
from bench.paired import Pair, Side, render_paired, run_pair, run_paired
from bench.procs import cpu_seconds
from gateway.pb import bench_pb2, bench_pb2_grpc

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None,
                                reason="h2load (Debian nghttp2-client) is not installed")


class _Echo(bench_pb2_grpc.EchoServicer):
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def Echo(self, request: bench_pb2.EchoMessage, context: Any) -> bench_pb2.EchoMessage:
        if self.fail:  # HTTP 200, grpc-status UNAVAILABLE: must not count as OK
            context.abort(grpc.StatusCode.UNAVAILABLE, "no")
        return request


def _server(fail: bool) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    bench_pb2_grpc.add_EchoServicer_to_server(_Echo(fail), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    good, good_addr = _server(False)
    bad, bad_addr = _server(True)
    try:
        yield good_addr, bad_addr
    finally:
        good.stop(0)
        bad.stop(0)


def _side(label: str, address: str) -> Side:
    return Side(label, address, "external", lambda: [], 0)


@pytest.mark.timeout(120)
def test_pair_alternates_and_checks_grpc_status(servers: tuple[str, str],
                                                tmp_path: Path) -> None:
    good, bad = servers
    frame, _ = write_echo_frame(tmp_path / "echo.frame")
    pair = Pair("same server", _side("a", good), _side("b", good), ">= 0.9")
    r = run_pair(pair, h2load, cpu_seconds, frame, tmp_path, rounds=2, seconds=0.3)
    assert r["ok"] is True
    assert len(r["calls_per_s_ratios"]) == 2 and r["calls_per_s_ratio"] > 0
    assert r["a_calls_per_s"] > 0 and r["b_calls_per_s"] > 0
    assert r["a_proxy_cpu_us"] is None  # no proxy process on either side
    failing = Pair("failing b", _side("a", good), _side("b", bad), "-")
    assert run_pair(failing, h2load, cpu_seconds, frame, tmp_path, rounds=1,
                    seconds=0.3)["ok"] is False


@pytest.mark.timeout(120)
def test_equal_load_pair_runs_at_the_rate_it_names(servers: tuple[str, str],
                                                   tmp_path: Path) -> None:
    good, _ = servers
    frame, _ = write_echo_frame(tmp_path / "echo.frame")
    pair = Pair("p", _side("a", good), _side("b", good), "-")
    rows = run_paired([pair], Pair("eq", _side("a", good), _side("b", good), "-"),
                      h2load, cpu_seconds, frame, tmp_path, smoke=True)
    assert [r["name"] for r in rows] == ["p", "eq"]
    eq = rows[1]
    assert eq["ok"] and eq["rps"] >= 20
    # h2load holds the offered rate: the measured rate is near it, not the saturated one.
    assert eq["a_calls_per_s"] <= eq["rps"] * 1.5
    text = "\n".join(render_paired(rows))
    assert "## Paired ratios" in text and f"{eq['rps']} calls/s each" in text
