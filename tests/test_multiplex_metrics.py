"""The seven `ray_serve_*multiplexed*` rows after known traffic, and records per model id."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import PredictRequest, text_stub
from tests.metrics_util import scrape_until
from tests.test_multiplex_routing import call, mux_app


async def test_exact_metric_values_after_known_traffic(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "2")
    async with start_gateway([mux_app(1)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        # a (load), a (hit), b (load), c (load, evicts a), a (load, evicts b),
        # fail-1 (evicts c, then fails to load).
        for mid in ("a", "a", "b", "c", "a"):
            await call(stub, mid)
        with pytest.raises(grpc.aio.AioRpcError):
            await call(stub, "fail-1")
        (slot,) = [s for _, s in gw.controller.slots()]
        base = {"application": "mx", "deployment": "MuxText", "replica": slot.replica_id}

        def get(name: str, **extra: str) -> float | None:
            return s.get(name, **base, **extra)

        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_multiplexed_get_model_requests_counter_total", **base) == 6)
        assert get("ray_serve_multiplexed_get_model_requests_counter_total") == 6
        assert get("ray_serve_multiplexed_models_load_counter_total") == 4
        assert get("ray_serve_multiplexed_models_unload_counter_total") == 3
        assert get("ray_serve_num_multiplexed_models") == 1
        assert get("ray_serve_multiplexed_model_load_latency_ms_count") == 4
        assert get("ray_serve_multiplexed_model_unload_latency_ms_count") == 3
        assert get("ray_serve_multiplexed_model_load_latency_ms_sum") >= 4 * 20  # 20 ms loads
        assert get("ray_serve_multiplexed_model_load_latency_ms_bucket", le="+Inf") == 4
        registered = {dict(k)["model_id"]: v for k, v in
                      s.series("ray_serve_registered_multiplexed_model_id").items()}
        assert registered == {"a": 1}  # b and c were unloaded: their series are gone
        for name in ("ray_serve_registered_multiplexed_model_id",):
            assert s.label_keys(name) == {frozenset({*base, "model_id"})}
        assert s.types["ray_serve_multiplexed_model_load_latency_ms"] == "histogram"
        assert s.types["ray_serve_num_multiplexed_models"] == "gauge"
        assert s.types["ray_serve_multiplexed_models_load_counter"] == "counter"
        # Not declared by model code: no "reserved name" warning dropped them.
        assert s.text.count("# TYPE ray_serve_num_multiplexed_models gauge") == 1


async def test_records_are_named_by_model_id_and_actuals_join_per_model(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    app = mux_app(2)
    app["prediction_records"] = {"enabled": True, "field_mapping": {
        "features": ["text"], "prediction_label": "label"}}
    tagged = {**mux_app(1), "name": "tagged"}
    tagged["prediction_records"] = {"enabled": True, "multiplexed_model_id": "tag",
                                    "model_name": "shared", "field_mapping": {
                                        "features": ["text"], "prediction_label": "label"}}
    async with start_gateway([app, tagged], records={"flush_interval_s": 0.05}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for n, mid in enumerate(("tenant-a", "tenant-b", "tenant-a")):
            await stub.Predict(PredictRequest(text="good"), timeout=20, metadata=(
                ("application", "mx"), ("multiplexed_model_id", mid), ("x-request-id", f"r{n}")))
        await stub.Predict(PredictRequest(text="good"), timeout=20, metadata=(
            ("application", "tagged"), ("multiplexed_model_id", "tenant-c"),
            ("x-request-id", "t0")))
        accepted, _, msg = await asyncio.to_thread(gw.records.log_actuals, "mx", [
            {"prediction_id": "r1:0", "actual_label": "tenant-b",
             "multiplexed_model_id": "tenant-b"}])
        assert accepted == 1, msg
        path = tmp_path / "logs" / "records.jsonl"
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        lines: list[dict[str, Any]] = []
        while loop.time() < end:
            if path.exists():
                lines = [json.loads(x) for x in path.read_text().splitlines()]
                if len(lines) >= 5:
                    break
            await asyncio.sleep(0.1)
    preds = {d["prediction_id"]: d for d in lines if d["kind"] == "prediction"}
    assert {k: d["model_name"] for k, d in preds.items()} == {
        "r0:0": "tenant-a", "r1:0": "tenant-b", "r2:0": "tenant-a", "t0:0": "shared"}
    assert preds["r1:0"]["prediction_label"] == "tenant-b"
    assert preds["t0:0"]["tags"]["multiplexed_model_id"] == "tenant-c"
    assert preds["r0:0"]["tags"]["multiplexed_model_id"] == "tenant-a"
    (actual,) = [d for d in lines if d["kind"] == "actual"]
    assert actual["model_name"] == "tenant-b" and actual["prediction_id"] == "r1:0"
