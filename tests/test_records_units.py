"""Record pipeline parts on their own: exporter registry, tensor decoding, Arize validation
rules (real SDK, fake receiver), JSONL rotation, bounded queues, config and the actuals CSV."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import yaml

from exporters.records import registry
from exporters.records.arize import ArizeExporter
from exporters.records.base import (
    ActualRecord,
    ExporterContext,
    ExportResult,
    PredictionRecord,
    Record,
    RecordExporter,
)
from exporters.records.jsonl import JsonlExporter
from gateway.config import ConfigError, parse_config
from gateway.dataplane.proxy import CallRecord
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.records.pipeline import (
    OIP_INFER,
    ActualsFileError,
    DecodeProblem,
    RecordPipeline,
    read_actuals_csv,
    tensor_values,
)
from tests.conftest import IRIS_APP, TEXT_APP
from tests.fake_arize import FakeArize

KEY = "ak-UNIT-0b5d2a77-DO-NOT-LOG"
SPACE = "space-unit-41"


@pytest.fixture(autouse=True)
def _no_arize_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID", "ARIZE_API_HOST", "ARIZE_API_PORT",
                "ARIZE_API_SCHEME"):
        monkeypatch.delenv(var, raising=False)


# -- registry ----------------------------------------------------------------------------------


def test_each_builtin_exporter_resolves_through_its_entry_point() -> None:
    assert {"arize", "jsonl"} <= set(registry.available())
    assert registry.resolve("arize") is ArizeExporter
    assert registry.resolve("jsonl") is JsonlExporter
    assert registry.resolve("exporters.records.jsonl:JsonlExporter") is JsonlExporter


def test_bad_exporter_names_get_clear_errors() -> None:
    with pytest.raises(registry.ExporterNotFound, match=r"registered: .*arize.*jsonl"):
        registry.resolve("kafka")
    with pytest.raises(registry.ExporterNotFound, match="cannot import 'no_such_mod'"):
        registry.resolve("no_such_mod:X")
    with pytest.raises(TypeError, match="not a subclass of RecordExporter"):
        registry.resolve("json:dumps")
    with pytest.raises(ConfigError, match=r"prediction_records.exporters \['kafka'\] are not "):
        parse_config({"applications": [{**IRIS_APP, "prediction_records": {
            "enabled": True, "exporters": ["kafka"]}}]})
    with pytest.raises(ConfigError, match="model_type"):
        parse_config({"applications": [{**IRIS_APP, "prediction_records": {
            "model_type": "RANKING"}}]})


# -- config and secrets ------------------------------------------------------------------------


def test_keys_come_from_the_environment_and_are_redacted() -> None:
    cfg = parse_config({}, env={"ARIZE_API_KEY": KEY, "ARIZE_SPACE_ID": SPACE})
    a = cfg.records.arize
    assert a.api_key is not None and a.api_key.get_secret_value() == KEY
    assert a.space_id is not None and a.space_id.get_secret_value() == SPACE
    dumped = yaml.safe_dump(cfg.redacted()) + repr(cfg) + str(cfg.model_dump(mode="json"))
    assert KEY not in dumped and SPACE not in dumped
    # A key set in the file wins over the environment.
    cfg = parse_config({"records": {"arize": {"api_key": "from-file"}}},
                       env={"ARIZE_API_KEY": KEY})
    assert cfg.records.arize.api_key.get_secret_value() == "from-file"  # type: ignore[union-attr]
    assert RecordPipeline(parse_config({}, env={}), Path(".")).exporters.arize_keys_set is False


def test_an_arize_client_that_cannot_start_falls_back_to_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ARIZE_SINGLE_HOST", "a.example")  # two endpoint overrides: the SDK
    monkeypatch.setenv("ARIZE_BASE_DOMAIN", "b.example")  # refuses to build a client
    cfg = parse_config({"applications": [{**IRIS_APP, "prediction_records": {"enabled": True}}]},
                       env={"ARIZE_API_KEY": KEY, "ARIZE_SPACE_ID": SPACE})
    pipeline = RecordPipeline(cfg, tmp_path)
    pipeline.start()
    try:
        assert pipeline.workers["arize"] is pipeline.workers["jsonl"]
        assert isinstance(pipeline.workers["jsonl"].exporter, JsonlExporter)
    finally:
        pipeline.shutdown(1)
    text = caplog.text
    assert "Multiple endpoint override" in text and "JSONL file instead" in text
    assert KEY not in text and SPACE not in text


def test_default_exporter_is_arize_with_both_keys_else_jsonl() -> None:
    both = parse_config({}, env={"ARIZE_API_KEY": KEY, "ARIZE_SPACE_ID": SPACE})
    one = parse_config({}, env={"ARIZE_API_KEY": KEY})
    assert RecordPipeline(both, Path(".")).exporters.resolve_name("default") == "arize"
    assert RecordPipeline(one, Path(".")).exporters.resolve_name("default") == "jsonl"


# -- Open Inference tensors --------------------------------------------------------------------


def test_tensor_values_typed_and_raw() -> None:
    c = pb.InferTensorContents(fp32_contents=[1.1, 2.5], int64_contents=[7], bool_contents=[True])
    assert tensor_values("x", "FP32", [2], c, None) == [1.1, 2.5]
    assert tensor_values("x", "INT64", [1], c, None) == [7]
    assert tensor_values("x", "BOOL", [1, 1], c, None) == [True]
    assert tensor_values("x", "INT16", [3], None, struct.pack("<3h", -1, 0, 9)) == [-1, 0, 9]
    assert tensor_values("x", "FP16", [2], None, struct.pack("<2e", 0.5, 2.0)) == [0.5, 2.0]
    assert tensor_values("x", "UINT8", [2], None, bytes([3, 250])) == [3, 250]
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", "é".encode()))
    assert tensor_values("x", "BYTES", [3], None, raw) == ["ab", "", "é"]
    with pytest.raises(DecodeProblem, match="7 raw bytes for shape"):
        tensor_values("x", "FP32", [2], None, b"\0" * 7)
    with pytest.raises(DecodeProblem, match="1 values for shape"):
        tensor_values("x", "INT64", [2], c, None)
    with pytest.raises(DecodeProblem, match="malformed"):
        tensor_values("x", "BYTES", [1], None, b"\x05\0\0\0ab")
    with pytest.raises(DecodeProblem, match="needs raw contents"):
        tensor_values("x", "FP16", [1], c, None)


def call_record(request: bytes, response: bytes | None, code: grpc.StatusCode = grpc.StatusCode.OK,
                app: str = "classifier", method: str = OIP_INFER, rid: str = "r-1") -> CallRecord:
    return CallRecord(app, "Iris", f"{app}#Iris#abc", method, method, code, "", 0.0042,
                      time.time(), rid, len(request), len(response or b""), False, request,
                      response)


def test_oip_probabilities_bytes_inputs_and_long_ids() -> None:
    cfg = parse_config({"applications": [{**IRIS_APP, "prediction_records": {"enabled": True}}]})
    pipeline = RecordPipeline(cfg, Path("."))
    plan = pipeline._plans["classifier"]
    req = pb.ModelInferRequest(model_name="m", model_version="7", inputs=[
        pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[2],
            contents=pb.InferTensorContents(bytes_contents=[b"hi", b"yo"])),
        pb.ModelInferRequest.InferInputTensor(
            name="n", datatype="INT32", shape=[2, 1],
            contents=pb.InferTensorContents(int_contents=[4, 5])),
    ])
    resp = pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(
        name="probs", datatype="FP64", shape=[2, 3],
        contents=pb.InferTensorContents(fp64_contents=[0.1, 0.7, 0.2, 0.6, 0.3, 0.1]))])
    rid = "x" * 512
    recs = pipeline._decode(plan, call_record(req.SerializeToString(),
                                              resp.SerializeToString(), rid=rid))
    assert [r.features for r in recs] == [{"text": "hi", "n": 4}, {"text": "yo", "n": 5}]
    assert [(r.prediction_label, r.prediction_score) for r in recs] == [("1", 0.7), ("0", 0.6)]
    # The model name comes from the config (here: the application), the request's is a tag.
    assert recs[0].model_name == "classifier" and recs[0].tags["oip_model"] == "m"
    assert recs[0].model_version == "7"
    # Too long with the row suffix: hashed, still distinct per row and within Arize's 512.
    assert all(len(r.prediction_id) <= 512 for r in recs)
    assert recs[0].prediction_id != recs[1].prediction_id
    assert recs[0].tags["latency_ms"] == 4.2 and recs[0].tags["row"] == 0
    # A failed call: features, no prediction, the status as a tag.
    one_row = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(
        name="n", datatype="INT32", shape=[1, 2],
        contents=pb.InferTensorContents(int_contents=[4, 5]))])
    (failed,) = pipeline._decode(plan, call_record(
        one_row.SerializeToString(), None, grpc.StatusCode.INVALID_ARGUMENT))
    assert failed.features == {"n_0": 4, "n_1": 5} and failed.prediction_id == "r-1:0"
    assert failed.prediction_label is None and failed.tags["status_code"] == "INVALID_ARGUMENT"


def test_the_call_path_only_queues_and_drops_what_does_not_fit() -> None:
    cfg = parse_config({"records": {"queue_size": 2}, "applications": [
        {**IRIS_APP, "prediction_records": {"enabled": True, "max_payload_bytes": 100}}]})
    pipeline = RecordPipeline(cfg, Path("."))  # not started: nothing drains the intake
    small = call_record(b"x" * 10, b"y")
    pipeline.observe(call_record(b"x" * 101, b"y"))
    for _ in range(3):
        pipeline.observe(small)
    pipeline.observe(CallRecord("classifier", "", "", OIP_INFER, OIP_INFER, grpc.StatusCode.OK,
                                "", 0.0, 0.0, "r", 0, 0, False))  # not sampled: ignored
    assert pipeline.calls_sampled == 4
    # The too-large call is queued without its payload (its record says so).
    dropped = {k: v for k, v in pipeline.calls_dropped.items() if v}
    assert dropped == {"payload_too_large": 1, "queue_full": 2}
    assert pipeline.snapshot()["intake_depth"] == 2
    assert pipeline._intake[0][1].request is None and pipeline._intake[0][3] is not None


# -- Arize exporter: validation rules, retries (real SDK, fake receiver) -----------------------


def arize(fake: FakeArize, **settings: Any) -> ArizeExporter:
    base = {"api_key": KEY, "space_id": SPACE, "api_scheme": "http", "api_host": fake.host,
            "api_port": fake.port, "timeout_s": 2, "max_retries": 3, "backoff_initial_s": 0.02,
            "backoff_max_s": 0.1}
    return ArizeExporter({}, ExporterContext(Path("."), {**base, **settings}))


def prediction(**kw: Any) -> PredictionRecord:
    base: dict[str, Any] = {"prediction_id": "p-1", "model_name": "m",
                            "prediction_timestamp": int(time.time()),
                            "prediction_label": "cat", "prediction_score": 1}
    return PredictionRecord(**{**base, **kw})


def test_arize_records_are_shaped_to_pass_the_sdk_validation() -> None:
    with FakeArize() as fake:
        ex = arize(fake)
        res = ex.export([
            prediction(prediction_id="a" * 600, tags={"response_latency_ms": 3.0, "x_shap": 1,
                                                      "long": "z" * 5000},
                       features={"f_shap": 1.0, "words": ["a", "b"], "n": None}),
            prediction(prediction_id="num", model_type="REGRESSION", prediction_label="2.5",
                       prediction_score=None),
            prediction(prediction_id="bad", model_type="NUMERIC", prediction_label="cat",
                       prediction_score=None),
            prediction(prediction_id="  "),
            ActualRecord(prediction_id="p-1", model_name="m", actual_label=None,
                         actual_score=None),
        ])
        ex.shutdown()
        assert (res.exported, res.invalid, res.failed) == (2, 3, 0)
        got = fake.by_prediction_id()
    hashed = next(r for pid, r in got.items() if len(pid) == 64)
    t = hashed.prediction.tags
    assert "gateway_response_latency_ms" in t and "x_shap_" in t
    assert len(t["long"].string) == 1000
    assert "f_shap_" in hashed.prediction.features
    assert list(hashed.prediction.features["words"].multi_value.values) == ["a", "b"]
    # Scores always go out as floats (an int score is not accepted by the SDK's tuple check).
    assert hashed.prediction.prediction_label.score_categorical.score_category.score == 1.0
    assert got["num"].prediction.prediction_label.numeric == 2.5


def test_arize_retries_429_and_5xx_with_a_bound() -> None:
    with FakeArize() as fake:
        ex = arize(fake, max_retries=3)
        fake.fail_next, fake.fail_status = 2, 429
        res = ex.export([prediction()])
        assert (res.exported, res.retries, fake.attempts) == (1, 2, 3)
        fake.status = 503
        res = ex.export([prediction(prediction_id="p-2")])
        assert (res.exported, res.failed, res.retries) == (0, 1, 3)
        assert fake.attempts == 3 + 4
        ex.shutdown()


def test_arize_connection_errors_are_retried_then_counted() -> None:
    fake = FakeArize().start()
    fake.stop()  # nothing listens on that port any more
    ex = arize(fake, max_retries=2)
    res = ex.export([prediction(), prediction(prediction_id="p-2")])
    assert (res.exported, res.failed, res.retries) == (0, 2, 4)
    assert res.error is not None and KEY not in res.error
    ex.shutdown()


def test_arize_exporter_needs_both_keys() -> None:
    with pytest.raises(ValueError, match="API key and a space id"):
        ArizeExporter({}, ExporterContext(Path("."), {"api_key": KEY}))


# -- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_rotates_and_keeps_backup_count(tmp_path: Path) -> None:
    ex = JsonlExporter({"max_bytes": 600, "backup_count": 2}, ExporterContext(tmp_path))
    for i in range(30):
        assert ex.export([prediction(prediction_id=f"p-{i}")]).exported == 1
    ex.shutdown()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["records.jsonl", "records.jsonl.1", "records.jsonl.2"]
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["prediction_id"] == "p-29"
    assert all(p.stat().st_size <= 600 for p in tmp_path.iterdir())


def test_jsonl_write_failure_is_returned_not_raised(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a directory should be")
    ex = JsonlExporter({"path": str(tmp_path / "blocked" / "r.jsonl")}, ExporterContext(tmp_path))
    res = ex.export([prediction()])
    assert (res.exported, res.failed) == (0, 1) and res.error


# -- per-exporter queues -----------------------------------------------------------------------


class Slow(RecordExporter):
    got: ClassVar[list[Record]] = []

    def export(self, batch: Sequence[Record]) -> ExportResult:
        time.sleep(0.3)
        Slow.got.extend(batch)
        return ExportResult(exported=len(batch))


class Fast(RecordExporter):
    got: ClassVar[list[Record]] = []

    def export(self, batch: Sequence[Record]) -> ExportResult:
        Fast.got.extend(batch)
        return ExportResult(exported=len(batch))


class Raises(RecordExporter):
    def export(self, batch: Sequence[Record]) -> ExportResult:
        raise RuntimeError("broken plug-in")


def test_a_slow_exporter_drops_its_own_records_and_starves_no_other() -> None:
    Slow.got.clear()
    Fast.got.clear()
    cfg = parse_config({"records": {"batch_size": 2, "flush_interval_s": 0.01, "exporters": [
        {"name": "slow", "type": "tests.test_records_units:Slow", "queue_size": 3},
        {"name": "fast", "type": "tests.test_records_units:Fast"},
        {"name": "raises", "type": "tests.test_records_units:Raises"},
    ]}, "applications": [{**TEXT_APP, "prediction_records": {
        "enabled": True, "exporters": ["slow", "fast", "raises"], "model_name": "t",
        "field_mapping": {"features": ["text"]}}}]})
    pipeline = RecordPipeline(cfg, Path("."))
    from gateway.dataplane.methods import MethodTable

    pipeline.methods = MethodTable()
    pipeline.start()
    from gateway.pb import text_model_pb2

    body = text_model_pb2.PredictRequest(text="hi").SerializeToString()
    threads_before = threading.active_count()
    for i in range(40):
        pipeline.observe(call_record(body, None, app="text", method="/demo.text.TextModel/Predict",
                                     rid=f"q-{i}"))
    assert pipeline.flush(10)
    assert len(Fast.got) == 40
    slow = pipeline.stats["slow"]
    assert slow.dropped["queue_full"] > 0
    assert slow.exported + slow.dropped["queue_full"] == 40
    assert pipeline.stats["raises"].failed == 40
    assert threading.active_count() == threads_before
    pipeline.shutdown(2)


# -- actuals -------------------------------------------------------------------------------------


def test_actuals_csv(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("prediction_id,actual\nr-1,setosa\n\nr-2, 3.5\n")
    assert read_actuals_csv(p) == [
        {"prediction_id": "r-1", "actual_label": "setosa"},
        {"prediction_id": "r-2", "actual_label": "3.5", "actual_score": 3.5},
    ]
    p.write_text("r-1,setosa\n,x\n")
    with pytest.raises(ActualsFileError, match="line 2: empty prediction_id"):
        read_actuals_csv(p)
    with pytest.raises(ActualsFileError, match="cannot read"):
        read_actuals_csv(tmp_path / "missing.csv")


def test_log_actuals_rejects_what_cannot_join() -> None:
    cfg = parse_config({"applications": [{**IRIS_APP, "prediction_records": {
        "enabled": True, "model_type": "NUMERIC", "exporters": ["mem"]}}],
        "records": {"exporters": [{"name": "mem", "type": "tests.test_records_units:Fast"}]}})
    pipeline = RecordPipeline(cfg, Path("."))
    Fast.got.clear()
    acc, rej, msg = pipeline.log_actuals("classifier", [
        {"prediction_id": "a", "actual_score": 1.5},
        {"prediction_id": "b", "actual_label": "2"},
        {"prediction_id": "c", "actual_label": "cat"},
        {"prediction_id": "x" * 513, "actual_label": "1"},
        {"prediction_id": "d"},
    ])
    assert (acc, rej) == (2, 3)
    assert "NUMERIC model needs a numeric actual" in msg and "no actual" in msg
    assert pipeline.flush(5)
    assert [(a.prediction_id, a.actual_score) for a in Fast.got
            if isinstance(a, ActualRecord)] == [("a", 1.5), ("b", 2.0)]
    assert pipeline.log_actuals("other", [{"prediction_id": "a"}])[:2] == (0, 1)
    pipeline.shutdown(2)
