"""Records through a real gateway (issue 10): streaming calls, drop counters from the start,
and actuals that never block the event loop."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import grpc

from exporters.records.base import ExportResult, Record, RecordExporter
from gateway.admin.service import AdminClient
from gateway.config import parse_config
from gateway.pb import admin_pb2, text_model_pb2, text_model_pb2_grpc
from gateway.records.capture import MAX_MESSAGES, Budget, StreamCapture
from gateway.records.pipeline import RecordPipeline
from tests.conftest import TEXT_APP
from tests.test_records import flush, scrape
from tests.test_records_units import call_record

CALL_DROP_REASONS = ("queue_full", "decode_error", "mapper_error", "no_rows", "too_many_rows",
                     "tensor_skipped", "payload_too_large", "too_many_messages", "capture_budget",
                     "not_served")
EXPORTER_DROP_REASONS = ("queue_full", "invalid", "shutdown", "exporter_unavailable")
"""The reasons the README documents."""
MAPPING = {"features": ["text"], "prediction_label": "label", "prediction_score": "score"}
Req = text_model_pb2.PredictRequest


def text_app(name: str = "text", **records: Any) -> dict[str, Any]:
    return {**TEXT_APP, "name": name, "prediction_records": {
        "enabled": True, "field_mapping": MAPPING, **records}}


async def requests(texts: Sequence[str]) -> AsyncIterator[Any]:
    for t in texts:
        yield Req(text=t)


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    return {d["prediction_id"]: d for d in map(json.loads, path.read_text().splitlines())
            if d["kind"] == "prediction"}


async def test_streaming_calls_become_one_record_each(start_gateway: Any, tmp_path: Path) -> None:
    apps = [text_app(), text_app("small", max_payload_bytes=40)]
    async with start_gateway(apps, records={"flush_interval_s": 0.05}) as gw:
        async with grpc.aio.insecure_channel(gw.address) as ch:
            stub = text_model_pb2_grpc.TextModelStub(ch)

            def md(rid: str, app: str = "text") -> Any:
                return (("application", app), ("x-request-id", rid))

            await stub.Predict(Req(text="good"), metadata=md("u-1"), timeout=10)
            got = [r async for r in stub.PredictStream(Req(text="I love it", repeat=3),
                                                       metadata=md("ss-1"), timeout=10)]
            assert len(got) == 3
            await stub.PredictBatch(requests(["good", "bad", "great"]), metadata=md("cs-1"),
                                    timeout=10)
            chat = [r async for r in stub.Chat(requests(["good", "awful"]), metadata=md("bi-1"),
                                               timeout=10)]
            assert [r.label for r in chat] == ["positive", "negative"]
            # Over the cap: the call is still a record, without its messages.
            await stub.PredictBatch(requests(["x" * 20] * 5), metadata=md("big-1", "small"),
                                    timeout=10)
        await flush(gw)
        dropped = gw.records.snapshot()["calls_dropped"]
    recs = read_records(tmp_path / "logs" / "records.jsonl")
    assert set(recs) == {"u-1:0", "ss-1:0", "cs-1:0", "bi-1:0", "big-1:0"}
    ss, cs, bi, big = recs["ss-1:0"], recs["cs-1:0"], recs["bi-1:0"], recs["big-1:0"]
    assert ss["features"] == {"text": "I love it"} and ss["prediction_label"] == "positive"
    assert (ss["tags"]["request_messages"], ss["tags"]["response_messages"]) == (1, 3)
    assert ss["tags"]["method"] == "/demo.text.TextModel/PredictStream"
    assert cs["features"] == {"text": ["good", "bad", "great"]}
    assert (cs["tags"]["request_messages"], cs["tags"]["response_messages"]) == (3, 1)
    assert bi["features"] == {"text": ["good", "awful"]}
    assert bi["prediction_label"] == "negative"  # the last answer of the stream
    assert 0.0 < bi["prediction_score"] < 0.5
    assert big["features"] == {} and big["application"] == "small"
    assert big["tags"]["payload_dropped"] == "request larger than max_payload_bytes"
    assert dropped["payload_too_large"] == 1


async def test_every_drop_reason_is_on_the_scrape_from_the_start(start_gateway: Any) -> None:
    async with start_gateway([text_app()], records={"flush_interval_s": 0.05}) as gw:
        assert gw.metrics_port is not None
        body = await asyncio.get_running_loop().run_in_executor(None, scrape, gw.metrics_port)
    values: dict[tuple[str, str], str] = {}
    for line in body.splitlines():
        if line.startswith("grpc_gateway_records_dropped_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            values[(labels["exporter"], labels["reason"])] = line.rsplit(" ", 1)[1]
    from gateway.records import pipeline as records

    assert set(CALL_DROP_REASONS) == set(records.CALL_DROP_REASONS)
    assert set(EXPORTER_DROP_REASONS) == set(records.EXPORTER_DROP_REASONS)
    for reason in CALL_DROP_REASONS:
        assert values[("", reason)] == "0.0", reason
    for reason in EXPORTER_DROP_REASONS:
        assert values[("jsonl", reason)] == "0.0", reason


def test_stream_limits_count_their_own_reason(tmp_path: Path) -> None:
    """Too many (tiny) messages and an exhausted global budget are not `payload_too_large`:
    each has its own reason, so the runbook's advice (raise max_payload_bytes) is not wrong."""
    cfg = parse_config({"applications": [{**TEXT_APP, "prediction_records": {
        "enabled": True, "field_mapping": MAPPING}}]})
    pipeline = RecordPipeline(cfg, tmp_path)
    plan = pipeline._plans["text"]
    rec = call_record(b"", None, app="text", method="/demo.text.TextModel/PredictBatch", rid="s-1")
    many = StreamCapture(pipeline._observe_stream, plan.cap, pipeline._budget)
    for _ in range(MAX_MESSAGES + 1):
        many.response(b"\x0a\x01a")
    many.done(rec)
    starved = StreamCapture(pipeline._observe_stream, plan.cap, Budget(10))
    starved.response(b"x" * 11)
    starved.done(rec)
    big = StreamCapture(pipeline._observe_stream, plan.cap, pipeline._budget)
    big.response(b"x" * (plan.cap + 1))
    big.done(rec)
    dropped = {k: v for k, v in pipeline.calls_dropped.items() if v}
    assert dropped == {"too_many_messages": 1, "capture_budget": 1, "payload_too_large": 1}


class LoopCheckingExporter(RecordExporter):
    """Notes whether it was built on a thread running an event loop (as importing an SDK)."""

    built_on_loop: ClassVar[list[bool]] = []

    def __init__(self, options: Any, context: Any) -> None:
        super().__init__(options, context)
        try:
            asyncio.get_running_loop()
            LoopCheckingExporter.built_on_loop.append(True)
        except RuntimeError:
            LoopCheckingExporter.built_on_loop.append(False)

    def export(self, batch: Sequence[Record]) -> ExportResult:
        return ExportResult(exported=len(batch))


async def test_log_actuals_builds_exporters_off_the_event_loop(
    start_gateway: Any, tmp_path: Path
) -> None:
    LoopCheckingExporter.built_on_loop.clear()
    records = {"flush_interval_s": 0.05, "exporters": [
        {"name": "checking", "type": "tests.test_records_streams:LoopCheckingExporter"}]}
    async with start_gateway([text_app()], records=records) as gw:
        assert LoopCheckingExporter.built_on_loop == []
        # A new application whose exporter nothing has built yet (as after `gateway deploy`).
        new = parse_config({**gw.config.model_dump(mode="python", exclude={"records"}),
                            "records": records,
                            "applications": [text_app(), text_app("b", exporters=["checking"])]})
        gw.records.apply(new)
        addr = f"127.0.0.1:{gw.admin_port}"

        def rpc() -> Any:
            with AdminClient(addr) as c:
                return c._call("LogActuals", admin_pb2.LogActualsRequest(
                    application="b", actuals=[admin_pb2.Actual(prediction_id="x:0",
                                                                actual_label="positive")]))

        resp = await asyncio.get_running_loop().run_in_executor(None, rpc)
        assert resp.accepted == 1, resp.message
    assert LoopCheckingExporter.built_on_loop == [False]
