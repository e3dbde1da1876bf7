"""The `tenants` demo of `make run`: per-id iris models behind one application."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from examples.client import TENANTS, tenants
from gateway.config import load_config
from tests.conftest import running_gateway
from tests.metrics_util import scrape_until

REPO = Path(__file__).resolve().parents[1]


async def test_tenants_demo_answers_per_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(REPO / "examples" / "serve_config.yaml", env={})
    app = cfg.application("tenants")
    assert app is not None
    dep = app.ingress_deployment
    assert (dep.name, dep.num_replicas) == ("TenantIris", 2)
    data: dict[str, Any] = cfg.model_dump(mode="json", exclude_none=True)
    data["applications"] = [a for a in data["applications"] if a["name"] == "tenants"]
    data["proxy"]["port"] = 0
    data["admin"]["port"] = 0
    data["metrics"]["prometheus"]["port"] = 0
    data["logging_config"]["logs_dir"] = str(tmp_path / "logs")
    data["records"]["flush_interval_s"] = 0.05
    cfg = type(cfg).model_validate(data)
    async with running_gateway(cfg, tmp_path) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        first = await tenants(ch)
        again = await tenants(ch)  # five ids, four slots: some are loaded again
        assert first == again  # each id keeps its own model
        assert len({tuple(v) for v in first.values()}) == len(TENANTS)  # weights differ per id
        out = capsys.readouterr().out
        assert "tenants tenant-a: scores=" in out
        # Five ids on 2 replicas of 2 slots (evictions): every multiplexed row has series.
        rows = ("ray_serve_multiplexed_model_load_latency_ms_count",
                "ray_serve_multiplexed_model_unload_latency_ms_count",
                "ray_serve_num_multiplexed_models",
                "ray_serve_multiplexed_models_load_counter_total",
                "ray_serve_multiplexed_models_unload_counter_total",
                "ray_serve_registered_multiplexed_model_id",
                "ray_serve_multiplexed_get_model_requests_counter_total")
        s = await scrape_until(gw, lambda s: all(s.series(r) for r in rows))
        assert all(s.series(r) for r in rows), [r for r in rows if not s.series(r)]
    lines = (tmp_path / "logs" / "records.jsonl").read_text().splitlines()
    assert {f'"model_name": "{t}"' for t in TENANTS} <= {
        x for line in lines for x in [f'"model_name": "{t}"' for t in TENANTS] if x in line}
