"""Records are named by the client's multiplexed model id only for multiplexed deployments."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import PredictRequest, text_stub


async def test_a_plain_app_keeps_its_model_name_whatever_id_a_client_sends(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    app = {"name": "text", "deployments": [{"name": "TextModel",
           "import_path": "examples.models:TextModel", "num_replicas": 1}],
           "prediction_records": {"enabled": True, "model_name": "sentiment-v1", "field_mapping": {
               "features": ["text"], "prediction_label": "label"}}}
    async with start_gateway([app], records={"flush_interval_s": 0.05}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        await stub.Predict(PredictRequest(text="good"), timeout=20, metadata=(
            ("application", "text"), ("x-request-id", "plain")))
        await stub.Predict(PredictRequest(text="good"), timeout=20, metadata=(
            ("application", "text"), ("multiplexed_model_id", "someone-elses-model"),
            ("x-request-id", "withkey")))
        path = tmp_path / "logs" / "records.jsonl"
        lines: list[dict[str, Any]] = []
        end = time.monotonic() + 15
        while time.monotonic() < end and len(lines) < 2:
            if path.exists():
                lines = [json.loads(x) for x in path.read_text().splitlines()]
            await asyncio.sleep(0.1)
    got = {d["prediction_id"]: d["model_name"] for d in lines}
    assert got == {"plain:0": "sentiment-v1", "withkey:0": "sentiment-v1"}
