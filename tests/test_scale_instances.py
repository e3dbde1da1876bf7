"""Several gateways side by side, same config, no coordination: prediction ids unique across
them, each its own admin service (`gateway status --address`), its own metric series (a
`service.instance.id` for pushed metrics), and N gateways sharing one port on purpose
(`proxy.reuse_port`, SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import cli
from gateway.app import Gateway
from gateway.metrics.instance import instance_id
from gateway.pb.text_model_pb2 import PredictRequest
from tests.conftest import TEXT_APP, gateway_config, md, text_stub
from tests.metrics_util import scrape
from tests.test_records import flush


@pytest.fixture(autouse=True)
def _no_arize_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)


@contextlib.asynccontextmanager
async def gateways(tmp: Path, n: int, apps: list[dict[str, Any]],
                   **top: Any) -> AsyncIterator[list[Gateway]]:
    out: list[Gateway] = []
    try:
        for i in range(n):
            d = tmp / f"gw{i}"
            d.mkdir()
            extra = {k: (v(i, d) if callable(v) else v) for k, v in top.items()}
            gw = Gateway(gateway_config(apps, d, **extra), logs_dir=d / "logs")
            await gw.start(ready_timeout=30)
            out.append(gw)
        yield out
    finally:
        for gw in out:
            await gw.stop(grace=2)


async def test_prediction_ids_are_unique_across_gateways(tmp_path: Path) -> None:
    app = {**TEXT_APP, "prediction_records": {"enabled": True, "field_mapping": {
        "features": ["text"], "prediction_label": "label", "prediction_score": "score"}}}
    records = {"records": lambda i, d: {"jsonl_path": str(d / "records.jsonl"),
                                        "flush_interval_s": 0.05}}
    async with gateways(tmp_path, 2, [app], **records) as gws:
        for gw in gws:
            async with grpc.aio.insecure_channel(gw.address) as ch:
                for _ in range(25):  # no x-request-id: each gateway makes the ids
                    await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(),
                                                timeout=10)
            await flush(gw)
    ids = []
    for i in range(2):
        lines = (tmp_path / f"gw{i}" / "records.jsonl").read_text().splitlines()
        ids.append({d["prediction_id"] for d in map(json.loads, lines)
                    if d["kind"] == "prediction"})
        assert len(ids[i]) == 25
    assert not ids[0] & ids[1]
    # Random (uuid4) request ids (":0": the first record of the call): no counter or clock
    # two gateways could both be at.
    uuid4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}(:0)?")
    assert all(uuid4.fullmatch(p) for p in ids[0] | ids[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_gateways_share_a_port_with_reuse_port_each_with_its_own_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    port = _free_port()
    async with gateways(tmp_path, 2, [TEXT_APP],
                        proxy={"port": port, "reuse_port": True}) as gws:
        assert [gw.port for gw in gws] == [port, port]
        # Separate connections (grpc would otherwise share one subchannel between them):
        # the kernel spreads them over the two listeners.
        opts = [("grpc.use_local_subchannel_pool", 1)]
        for _ in range(24):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(),
                                                timeout=10)
                assert r.label == "positive"
        counts = []
        for gw in gws:
            got = await scrape(gw)
            counts.append(sum(got.series("ray_serve_num_grpc_requests_total").values()))
        assert sum(counts) == 24 and all(c > 0 for c in counts), counts
        # `gateway status --address` answers for the instance it names.
        loop = asyncio.get_running_loop()
        ids = [{s.replica_id for _, s in gw.controller.slots()} for gw in gws]
        for i, gw in enumerate(gws):
            admin = f"127.0.0.1:{gw.admin_port}"
            rc = await loop.run_in_executor(
                None, cli.main, ["status", "--verbose", "--address", admin])
            out = capsys.readouterr().out
            assert rc == 0 and "RUNNING" in out, out
            # Its own replicas, not the other instance's.
            assert all(r in out for r in ids[i]) and not any(r in out for r in ids[1 - i]), out


async def test_a_second_gateway_without_reuse_port_is_refused_clearly(tmp_path: Path) -> None:
    port = _free_port()
    async with gateways(tmp_path, 1, [TEXT_APP], proxy={"port": port}):
        d = tmp_path / "second"
        d.mkdir()
        gw = Gateway(gateway_config([TEXT_APP], d, proxy={"port": port}), logs_dir=d / "logs")
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await gw.start(ready_timeout=10)


def test_instance_id_tells_instances_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_INSTANCE_ID", raising=False)
    assert instance_id() == f"{socket.gethostname()}:{os.getpid()}"
    assert instance_id({"GATEWAY_INSTANCE_ID": "grpc-gateway-7c9f-abcde"}) == \
        "grpc-gateway-7c9f-abcde"
    # Blank or unprintable: the default, not a broken label.
    assert instance_id({"GATEWAY_INSTANCE_ID": " "}).endswith(f":{os.getpid()}")
    assert "\n" not in instance_id({"GATEWAY_INSTANCE_ID": "a\nb"})


async def test_pushed_metrics_carry_the_instance_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_INSTANCE_ID", "gw-pod-1")
    async with gateways(tmp_path, 1, [TEXT_APP]) as (gw,):
        assert gw.telemetry is not None
        attrs = dict(gw.telemetry.resource.attributes)
        assert attrs["service.instance.id"] == "gw-pod-1"
        assert attrs["service.name"] == "grpc-gateway"
