"""A real Prometheus server scrapes the gateway; PromQL over its HTTP API sees the traffic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import TEXT_APP, PredictRequest, md, text_stub

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
)
# Under CI the binary is installed by .ci/run: a missing one must fail, never skip.
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and os.environ.get("CI") != "true",
    reason="the prometheus binary is not installed (apt-get install prometheus)",
)
PREDICT = "/demo.text.TextModel/Predict"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@contextlib.contextmanager
def prometheus_server(tmp: Path, target_port: int) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:`target_port` every second; yields its base URL."""
    assert PROMETHEUS is not None, "prometheus binary missing (CI installs the Debian package)"
    port = _free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: gateway\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = await asyncio.to_thread(_get, url)
    if status != 200:
        return []
    data = json.loads(body)
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


@contextlib.asynccontextmanager
async def traffic(ch: grpc.aio.Channel) -> AsyncIterator[list[int]]:
    """Calls flowing in the background (bounded: at most one every 20 ms)."""
    done: list[int] = [0]
    stop = asyncio.Event()

    async def run() -> None:
        stub = text_stub(ch)
        while not stop.is_set() and done[0] < 5000:
            await stub.Predict(PredictRequest(text="good"), metadata=md())
            done[0] += 1
            await asyncio.sleep(0.02)

    task = asyncio.ensure_future(run())
    try:
        yield done
    finally:
        stop.set()
        await task


async def test_prometheus_scrapes_and_promql_answers(start_gateway: Any, tmp_path: Path) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        assert gw.metrics_port
        with prometheus_server(tmp_path, gw.metrics_port) as base:
            async with traffic(ch) as done:
                rate_q = "sum(rate(ray_serve_num_grpc_requests_total[1m])) by (application, method)"
                p99_q = ("histogram_quantile(0.99, "
                         "sum(rate(ray_serve_grpc_request_latency_ms_bucket[1m])) by (le))")
                loop = asyncio.get_running_loop()
                end = loop.time() + 60
                rates: list[dict[str, Any]] = []
                p99: list[dict[str, Any]] = []
                while loop.time() < end:
                    rates = await query(base, rate_q)
                    p99 = await query(base, p99_q)
                    if rates and p99 and not math.isnan(float(p99[0]["value"][1])):
                        break
                    await asyncio.sleep(0.5)
                assert done[0] > 0

            up = await query(base, 'up{job="gateway"}')
            assert [r["value"][1] for r in up] == ["1"]
            assert [r["metric"] for r in rates] == [{"application": "text", "method": PREDICT}]
            assert float(rates[0]["value"][1]) > 0
            assert len(p99) == 1 and p99[0]["metric"] == {}
            ms = float(p99[0]["value"][1])
            assert 0 < ms < 1000, ms  # a local call: well under a second, in milliseconds

            # The latency buckets Prometheus stored are the gateway's sub-millisecond ones.
            les = await query(base, 'count by (le) (ray_serve_grpc_request_latency_ms_bucket)')
            bounds = {r["metric"]["le"] for r in les}
            assert {"0.1", "0.25", "0.5", "1.0", "+Inf"} <= bounds
            # Gauges and per-replica series arrive too.
            healthy = await query(base, "ray_serve_deployment_replica_healthy")
            assert [(r["metric"]["application"], r["value"][1]) for r in healthy] == [
                ("text", "1")]
