"""Calls the gateway refuses before any replica has them make no prediction record (issue 10
follow-up): they carry no prediction, and a client retrying one with the same request id would
give Arize two records under one prediction id. They are counted `not_served` instead."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc

from gateway.pb import text_model_pb2, text_model_pb2_grpc
from tests.conftest import TEXT_APP
from tests.test_records import flush
from tests.test_records_streams import MAPPING


def md(rid: str) -> tuple[tuple[str, str], ...]:
    return (("application", "text"), ("x-request-id", rid))


async def test_calls_the_gateway_refused_make_no_record(start_gateway: Any,
                                                        tmp_path: Path) -> None:
    dep = {**TEXT_APP["deployments"][0], "max_ongoing_requests": 1,  # type: ignore[index]
           "max_queued_requests": 0}
    app = {**TEXT_APP, "deployments": [dep],
           "prediction_records": {"enabled": True, "field_mapping": MAPPING}}
    async with start_gateway([app], records={"flush_interval_s": 0.05}) as gw:
        async with grpc.aio.insecure_channel(gw.address) as ch:
            stub = text_model_pb2_grpc.TextModelStub(ch)
            Req = text_model_pb2.PredictRequest
            slow = asyncio.ensure_future(stub.Predict(Req(text="good", sleep_s=2.0),
                                                      metadata=md("slow-1"), timeout=20))
            for _ in range(500):  # until the slow call holds the only slot (bounded)
                if gw.proxy.admitted >= 1:
                    break
                await asyncio.sleep(0.01)
            refused = None
            try:
                await stub.Predict(Req(text="good"), metadata=md("same-id"), timeout=10)
            except grpc.aio.AioRpcError as e:
                refused = e.code()
            assert refused is grpc.StatusCode.RESOURCE_EXHAUSTED
            await slow
            # The client retries the refused call with the same request id: now served.
            await stub.Predict(Req(text="good"), metadata=md("same-id"), timeout=10)
        await flush(gw)
        dropped = gw.records.snapshot()["calls_dropped"]
    lines = [json.loads(line) for line in
             (tmp_path / "logs" / "records.jsonl").read_text().splitlines()]
    statuses = sorted((d["prediction_id"], d["tags"]["status_code"]) for d in lines
                      if d["kind"] == "prediction")
    # One record per id: the refused attempt made none.
    assert statuses == [("same-id:0", "OK"), ("slow-1:0", "OK")]
    assert dropped.get("not_served") == 1
