"""Prediction records end to end: real gateways, real replicas, the real arize SDK sending to a
fake Arize receiver that decodes every body into the SDK's own `Record` message."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from examples.models import classify
from exporters.records.base import ExportResult, PredictionRecord, Record, RecordExporter
from gateway import cli
from gateway.admin.service import AdminClient
from gateway.pb import admin_pb2, text_model_pb2, text_model_pb2_grpc
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.records.pipeline import CallInfo
from tests.conftest import IRIS_APP, TEXT_APP
from tests.fake_arize import FakeArize

KEY = "ak-TEST-7f3e9c1d-DO-NOT-LOG"
SPACE = "U3BhY2U6OTk5OnNlY3JldA=="
ROWS = [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3), (5.9, 2.8, 4.3, 1.3)]
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
INFER = "/inference.GRPCInferenceService/ModelInfer"
PREDICT = "/demo.text.TextModel/Predict"


@pytest.fixture(autouse=True)
def _no_arize_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID", "ARIZE_API_HOST", "ARIZE_API_PORT",
                "ARIZE_API_SCHEME", "ARIZE_REGION", "ARIZE_SINGLE_HOST", "ARIZE_SINGLE_PORT",
                "ARIZE_BASE_DOMAIN"):
        monkeypatch.delenv(var, raising=False)


def arize_section(fake: FakeArize, **extra: Any) -> dict[str, Any]:
    return {"arize": {"api_key": KEY, "space_id": SPACE, "api_scheme": "http",
                      "api_host": fake.host, "api_port": fake.port, "timeout_s": 2,
                      "max_retries": 2, "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
            "flush_interval_s": 0.05, **extra}


def iris_app(**records: Any) -> dict[str, Any]:
    return {**IRIS_APP, "prediction_records": {
        "enabled": True, "model_name": "iris", "model_version": "1",
        "field_mapping": {"column_names": {"features": COLUMNS}}, **records}}


def text_app(**records: Any) -> dict[str, Any]:
    return {**TEXT_APP, "prediction_records": {"enabled": True, **records}}


def infer_request(rows: Sequence[Sequence[float]], raw: bool = False,
                  request_id: str = "") -> pb.ModelInferRequest:
    flat = [v for r in rows for v in r]
    t = pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32",
                                              shape=[len(rows), 4])
    req = pb.ModelInferRequest(model_name="iris", id=request_id, inputs=[t])
    if raw:
        req.raw_input_contents.append(struct.pack(f"<{len(flat)}f", *flat))
    else:
        req.inputs[0].contents.fp32_contents.extend(flat)
    return req


async def infer(address: str, req: pb.ModelInferRequest, rid: str) -> pb.ModelInferResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        resp: pb.ModelInferResponse = await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            req, metadata=(("application", "classifier"), ("x-request-id", rid)), timeout=10)
    return resp


async def predict(address: str, text: str, rid: str, fail_code: int = 0) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            await text_model_pb2_grpc.TextModelStub(ch).Predict(
                text_model_pb2.PredictRequest(text=text, fail_code=fail_code),
                metadata=(("application", "text"), ("x-request-id", rid)), timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def flush(gw: Any, timeout: float = 15.0) -> None:
    ok = await asyncio.get_running_loop().run_in_executor(None, gw.records.flush, timeout)
    assert ok, gw.records.snapshot()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def tags(rec: Any) -> dict[str, Any]:
    out = {}
    for k, v in rec.prediction.tags.items():
        out[k] = getattr(v, v.WhichOneof("data"))
    return out


def features(rec: Any) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("data")) for k, v in rec.prediction.features.items()}


# -- Open Inference Protocol -------------------------------------------------------------------


async def test_oip_batched_call_becomes_one_arize_record_per_row(
    start_gateway: Any, tmp_path: Path
) -> None:
    with FakeArize() as fake:
        async with start_gateway([iris_app()], records=arize_section(fake)) as gw:
            t0 = int(time.time())
            resp = await infer(gw.address, infer_request(ROWS, request_id="batch-7"), "req-oip-1")
            raw_resp = await infer(gw.address, infer_request(ROWS[:1], raw=True), "req-oip-raw")
            await flush(gw)
            recs = fake.wait_for(4)
            body = await asyncio.get_running_loop().run_in_executor(None, scrape, gw.metrics_port)
        got = fake.by_prediction_id()
        assert len(recs) == 4, sorted(got)
        labels = list(resp.outputs[0].contents.bytes_contents)
        scores = list(resp.outputs[1].contents.fp32_contents)
        for i, row in enumerate(ROWS):
            rec = got[f"req-oip-1:batch-7:{i}"]
            assert rec.model_id == "iris"
            assert rec.prediction.model_version == "1"
            assert t0 - 1 <= rec.prediction.timestamp.seconds <= time.time()
            assert rec.prediction.timestamp.nanos == 0
            assert features(rec) == pytest.approx(dict(zip(COLUMNS, row, strict=True)))
            sc = rec.prediction.prediction_label.score_categorical.score_category
            assert sc.category == labels[i].decode() == classify(row)[0]
            assert sc.score == pytest.approx(scores[i])
            t = tags(rec)
            assert t["application"] == "classifier" and t["deployment"] == "Iris"
            assert t["replica"].startswith("classifier#Iris#")
            assert t["method"] == INFER and t["status_code"] == "OK"
            assert t["infer_id"] == "batch-7" and t["row"] == i
            assert t["request_id"] == "req-oip-1"
            assert 0 < t["latency_ms"] < 10_000
            assert rec.environment_params.HasField("production")
        # Raw contents decode to the same features; a one-row call's id ends in :0 too.
        raw = got["req-oip-raw:0"]
        assert features(raw) == pytest.approx(dict(zip(COLUMNS, ROWS[0], strict=True)))
        # The raw call was answered raw (gateway.oip.infer_response); records read both forms.
        assert raw.prediction.prediction_label.score_categorical.score_category.category == (
            raw_resp.raw_output_contents[0][4:].decode()) == classify(ROWS[0])[0]
        # The real SDK's transport: POST /v1/log, key and space id in headers.
        first = fake.received[0]
        assert first.path == "/v1/log"
        assert first.headers["authorization"] == KEY
        assert first.headers["grpc-metadata-arize-space-id"] == SPACE
        # Exporter health is visible on the scrape.
        assert 'grpc_gateway_records_exported_total{exporter="arize"' in body
        line = next(s for s in body.splitlines()
                    if s.startswith('grpc_gateway_records_exported_total{exporter="arize"'))
        assert float(line.rsplit(" ", 1)[1]) == 4.0
        assert "grpc_gateway_records_queue_depth" in body


# -- other protos: field mapping and user function -------------------------------------------


async def test_custom_proto_mapped_by_config(start_gateway: Any) -> None:
    mapping = {"features": ["text"], "prediction_label": "label", "prediction_score": "score"}
    with FakeArize() as fake:
        async with start_gateway([text_app(model_name="sentiment", field_mapping=mapping)],
                                 records=arize_section(fake)) as gw:
            assert await predict(gw.address, "I love this, great", "txt-1") is grpc.StatusCode.OK
            code = await predict(gw.address, "bad", "txt-fail", fail_code=3)
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            await flush(gw)
            fake.wait_for(2)
        got = fake.by_prediction_id()
        ok = got["txt-1:0"]
        assert ok.model_id == "sentiment"
        assert features(ok) == {"text": "I love this, great"}
        sc = ok.prediction.prediction_label.score_categorical.score_category
        assert sc.category == "positive" and 0.9 < sc.score <= 1.0
        assert tags(ok)["method"] == PREDICT and tags(ok)["status_code"] == "OK"
        # A failed call is recorded too: features from the request, its status in the tags.
        bad = got["txt-fail:0"]
        assert features(bad) == {"text": "bad"}
        assert tags(bad)["status_code"] == "INVALID_ARGUMENT"
        assert "failing as asked" in tags(bad)["status_details"]
        assert bad.prediction.prediction_label.score_categorical.category.category == (
            "INVALID_ARGUMENT")


def text_mapper(request: text_model_pb2.PredictRequest,
                response: text_model_pb2.PredictResponse | None,
                call: CallInfo) -> list[dict[str, Any]]:
    """A user mapping function (loaded by `module:function` from the config)."""
    assert isinstance(request, text_model_pb2.PredictRequest)
    assert response is None or isinstance(response, text_model_pb2.PredictResponse)
    return [{
        "prediction_id": f"user-{call.request_id}",
        "features": {"words": len(request.text.split()), "shouted": request.text.isupper()},
        "prediction_label": response.label if response is not None else None,
        "prediction_score": response.score if response is not None else None,
        "tags": {"mapper": "text_mapper", "response_latency_ms": call.latency_ms},
    }]


async def test_user_function_mapping(start_gateway: Any) -> None:
    with FakeArize() as fake:
        app = text_app(model_name="sentiment", mapper="tests.test_records:text_mapper")
        async with start_gateway([app], records=arize_section(fake)) as gw:
            assert await predict(gw.address, "awful bad day", "fn-1") is grpc.StatusCode.OK
            await flush(gw)
            (rec,) = fake.wait_for(1)
        assert rec.prediction_id == "user-fn-1"
        assert features(rec) == {"words": 3, "shouted": "False"}
        sc = rec.prediction.prediction_label.score_categorical.score_category
        assert sc.category == "negative" and sc.score < 0.1
        t = tags(rec)
        assert t["mapper"] == "text_mapper" and t["application"] == "text"
        # The SDK reserves `response_latency_ms`: renamed, not refused.
        assert "response_latency_ms" not in t and t["gateway_response_latency_ms"] > 0


class CollectingExporter(RecordExporter):
    """A third-party exporter defined in the test suite, loaded through the config."""

    name = "collecting"
    seen: ClassVar[list[Record]] = []
    shut: ClassVar[int] = 0

    def export(self, batch: Sequence[Record]) -> ExportResult:
        CollectingExporter.seen.extend(batch)
        return ExportResult(exported=len(batch))

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        CollectingExporter.shut += 1


async def test_exporter_from_the_test_suite_is_loaded_through_config(start_gateway: Any) -> None:
    CollectingExporter.seen.clear()
    records = {"flush_interval_s": 0.05, "exporters": [
        {"name": "mine", "type": "tests.test_records:CollectingExporter"}]}
    mapping = {"features": ["text"], "prediction_label": "label"}
    async with start_gateway([text_app(exporters=["mine"], field_mapping=mapping)],
                             records=records) as gw:
        await predict(gw.address, "good", "mine-1")
        await flush(gw)
        assert gw.records.stats["mine"].exported == 1
    (rec,) = CollectingExporter.seen
    assert isinstance(rec, PredictionRecord)
    assert rec.prediction_id == "mine-1:0" and rec.prediction_label == "positive"
    assert rec.features == {"text": "good"} and rec.model_name == "text"
    assert CollectingExporter.shut == 1


# -- delayed actuals ---------------------------------------------------------------------------


async def test_actuals_through_the_admin_rpc_and_the_cli(
    start_gateway: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeArize() as fake:
        async with start_gateway([iris_app()], records=arize_section(fake)) as gw:
            await infer(gw.address, infer_request(ROWS[:1]), "act-1")
            await infer(gw.address, infer_request(ROWS[1:2]), "act-2")
            addr = f"127.0.0.1:{gw.admin_port}"
            loop = asyncio.get_running_loop()

            def rpc() -> Any:
                with AdminClient(addr) as c:
                    return c._call("LogActuals", admin_pb2.LogActualsRequest(
                        application="classifier", actuals=[
                            admin_pb2.Actual(prediction_id="act-1:0", actual_label="setosa"),
                            admin_pb2.Actual(prediction_id="", actual_label="x"),
                        ]))

            resp = await loop.run_in_executor(None, rpc)
            assert (resp.accepted, resp.rejected) == (1, 1), resp.message
            assert "prediction id" in resp.message
            csv = tmp_path / "actuals.csv"
            csv.write_text("prediction_id,actual\nact-2:0,virginica\n")
            rc = await loop.run_in_executor(None, cli.main, [
                "actuals", "--address", addr, "--application", "classifier", str(csv)])
            assert rc == cli.EXIT_OK
            bad = tmp_path / "bad.csv"
            bad.write_text("act-3\n")
            rc_bad = await loop.run_in_executor(None, cli.main, [
                "actuals", "--address", addr, "--application", "classifier", str(bad)])
            rc_app = await loop.run_in_executor(None, cli.main, [
                "actuals", "--address", addr, "--application", "nope", str(csv)])
            await flush(gw)
            fake.wait_for(4)
        out = capsys.readouterr()
        assert "1 actual(s) accepted, 0 rejected" in out.out
        assert rc_bad == cli.EXIT_USAGE and "line 1: want 2 or 3 columns" in out.err
        assert rc_app == cli.EXIT_FAILED and "'nope' has no prediction records" in out.out
        actuals = {r.prediction_id: r for r in fake.records() if r.HasField("actual")}
        assert set(actuals) == {"act-1:0", "act-2:0"}
        for pid, label in (("act-1:0", "setosa"), ("act-2:0", "virginica")):
            a = actuals[pid]
            assert a.model_id == "iris"  # joined by model and prediction id
            assert a.actual.actual_label.score_categorical.category.category == label
            assert not a.HasField("prediction")


# -- an Arize that is down, slow or refuses ----------------------------------------------------


async def test_receiver_down_calls_succeed_and_records_flow_again_after(
    start_gateway: Any,
) -> None:
    fake = FakeArize().start()
    port = fake.port
    fake.stop()  # down from the start
    try:
        async with start_gateway([iris_app()], records=arize_section(fake)) as gw:
            for i in range(5):
                resp = await infer(gw.address, infer_request(ROWS[:1]), f"down-{i}")
                assert resp.outputs[0].contents.bytes_contents
            await flush(gw)
            st = gw.records.stats["arize"]
            assert st.failed == 5 and st.retries >= 5 and st.exported == 0
            fake = FakeArize(port).start()  # back, same address
            for i in range(3):
                await infer(gw.address, infer_request(ROWS[:1]), f"up-{i}")
            await flush(gw)
            recs = fake.wait_for(3)
            assert sorted(r.prediction_id for r in recs) == ["up-0:0", "up-1:0", "up-2:0"]
            assert gw.records.stats["arize"].exported == 3
    finally:
        fake.stop()


async def test_receiver_slow_keeps_queues_bounded(start_gateway: Any) -> None:
    with FakeArize() as fake:
        fake.delay_s = 30.0  # every POST hangs (released when the fake stops)
        records = arize_section(fake, batch_size=2, exporters=[
            {"name": "arize", "type": "arize", "queue_size": 4}])
        records["arize"]["timeout_s"] = 0.5
        records["arize"]["max_retries"] = 0
        async with start_gateway([iris_app()], records=records) as gw:
            codes = await asyncio.gather(*(
                infer(gw.address, infer_request(ROWS[:1]), f"slow-{i}") for i in range(30)))
            assert len(codes) == 30
            depth_seen = 0
            for _ in range(20):
                depth_seen = max(depth_seen, gw.records.workers["arize"].depth)
                await asyncio.sleep(0.02)
            st = gw.records.stats["arize"]
            snap = gw.records.snapshot()
            # Queue (4) plus the batch being sent (2) at most; the rest were dropped and counted.
            assert depth_seen <= 6
            assert st.dropped["queue_full"] >= 30 - 6 - 2, snap
            assert st.exported == 0


async def test_receiver_401_is_counted_failed_and_not_retried(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exporters.arize")
    with FakeArize() as fake:
        fake.status = 401
        async with start_gateway([iris_app()], records=arize_section(fake)) as gw:
            for i in range(4):
                await infer(gw.address, infer_request(ROWS[:1]), f"denied-{i}")
            await flush(gw)
            st = gw.records.stats["arize"]
            assert st.failed == 4 and st.retries == 0 and st.exported == 0
            assert fake.attempts == 4
    warnings = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert len(warnings) == 1, warnings


# -- without keys: JSONL -----------------------------------------------------------------------


async def test_no_keys_records_land_in_the_jsonl_file(start_gateway: Any, tmp_path: Path) -> None:
    mapping = {"features": ["text"], "prediction_label": "label", "prediction_score": "score"}
    async with start_gateway([iris_app(), text_app(field_mapping=mapping)],
                             records={"flush_interval_s": 0.05}) as gw:
        assert set(gw.records.workers) == {"jsonl"}
        await infer(gw.address, infer_request(ROWS[:2]), "file-1")
        await predict(gw.address, "great", "file-2")
        await flush(gw)
        assert gw.records.log_actuals("classifier", [
            {"prediction_id": "file-1:0", "actual_label": "setosa"}])[0] == 1
        await flush(gw)
    path = tmp_path / "logs" / "records.jsonl"
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    by_id = {d["prediction_id"]: d for d in lines if d["kind"] == "prediction"}
    assert set(by_id) == {"file-1:0", "file-1:1", "file-2:0"}
    first = by_id["file-1:0"]
    assert first["model_name"] == "iris" and first["model_version"] == "1"
    assert first["features"] == pytest.approx(dict(zip(COLUMNS, ROWS[0], strict=True)))
    assert first["prediction_label"] == classify(ROWS[0])[0]
    assert isinstance(first["prediction_score"], float)
    assert isinstance(first["prediction_timestamp"], int)
    assert first["tags"]["status_code"] == "OK" and first["tags"]["row"] == 0
    assert by_id["file-2:0"]["prediction_label"] == "positive"
    (actual,) = [d for d in lines if d["kind"] == "actual"]
    assert actual["prediction_id"] == "file-1:0" and actual["actual_label"] == "setosa"


# -- secrets -------------------------------------------------------------------------------------


async def test_a_whole_run_never_logs_the_keys(
    start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ARIZE_API_KEY", KEY)  # from the environment, as in production
    monkeypatch.setenv("ARIZE_SPACE_ID", SPACE)
    with FakeArize() as fake:
        records = arize_section(fake)
        del records["arize"]["api_key"], records["arize"]["space_id"]
        async with start_gateway([iris_app()], records=records) as gw:
            assert "arize" in gw.records.workers
            await infer(gw.address, infer_request(ROWS), "secret-1")
            await flush(gw)
            fake.status = 401
            await infer(gw.address, infer_request(ROWS[:1]), "secret-2")
            await flush(gw)
            fake.status = 500
            await infer(gw.address, infer_request(ROWS[:1]), "secret-3")
            await flush(gw)
            loop = asyncio.get_running_loop()
            addr = f"127.0.0.1:{gw.admin_port}"

            def admin() -> tuple[str, str]:
                with AdminClient(addr) as c:
                    return c.config_yaml(), c.status().to_yaml(verbose=True)

            config_text, status_text = await loop.run_in_executor(None, admin)
            snapshot = json.dumps(gw.records.snapshot())
        assert fake.received and fake.received[0].headers["authorization"] == KEY
    out = capfd.readouterr()
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    files = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*")
                      if p.is_file())
    for text in (logged, out.out, out.err, files, config_text, status_text, snapshot):
        assert KEY not in text and SPACE not in text
    assert "**********" in config_text
    assert "HTTP 401" in logged  # the failures were logged, just without the key


def test_sampling_happens_at_the_configured_rate() -> None:
    from gateway.config import parse_config
    from gateway.records.pipeline import RecordPipeline

    cfg = parse_config({"applications": [{**IRIS_APP, "prediction_records": {
        "enabled": True, "sample_rate": 0.25}}]})
    pipeline = RecordPipeline(cfg, Path("/nonexistent"))
    plan = pipeline._plans["classifier"]
    hits = sum(plan.capture(INFER) for _ in range(4000))
    assert 700 < hits < 1300
    assert not plan.capture("/inference.GRPCInferenceService/ServerLive")
    assert threading.active_count() >= 1
