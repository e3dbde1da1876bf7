"""Calls into records (issue 10): ids, model names, floats, Open Inference tensors, payload caps
and row caps; the pipeline's own pieces, no servers."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from gateway.config import MetricsConfig, parse_config
from gateway.dataplane.proxy import CallRecord
from gateway.metrics.telemetry import Telemetry
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.records.pipeline import MAX_ROWS_PER_CALL, OIP_INFER, RecordPipeline, tensor_values
from tests.conftest import IRIS_APP
from tests.test_records_units import call_record

Tensor = pb.ModelInferRequest.InferInputTensor


def pipeline(tmp: Path = Path("."), **records: Any) -> RecordPipeline:
    cfg = parse_config({"records": {"flush_interval_s": 0.02}, "applications": [
        {**IRIS_APP, "prediction_records": {"enabled": True, **records}}]})
    return RecordPipeline(cfg, tmp)


def decode(p: RecordPipeline, req: Any, resp: Any = None, rid: str = "r-1",
           code: grpc.StatusCode = grpc.StatusCode.OK, method: str = OIP_INFER) -> list[Any]:
    return p._decode(p._plans["classifier"], call_record(
        req.SerializeToString(), resp.SerializeToString() if resp is not None else None,
        code=code, rid=rid, method=method))


def oip(rows: int, model: str = "iris") -> tuple[Any, Any]:
    req = pb.ModelInferRequest(model_name=model, inputs=[Tensor(
        name="x", datatype="FP32", shape=[rows, 2],
        contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0] * rows))])
    resp = pb.ModelInferResponse(model_name=model, outputs=[
        pb.ModelInferResponse.InferOutputTensor(
            name="label", datatype="BYTES", shape=[rows],
            contents=pb.InferTensorContents(bytes_contents=[b"a"] * rows))])
    return req, resp


# -- item 3: actuals join their predictions, after a restart too ---------------------------------


def test_actuals_reach_the_model_their_predictions_used_after_a_restart(tmp_path: Path) -> None:
    first = pipeline(tmp_path)
    (pred,) = decode(first, *oip(1, model="iris"), rid="req-1")
    # Another gateway process (a restart): nothing remembered, same config.
    second = pipeline(tmp_path)
    second.start()
    try:
        accepted, _, msg = second.log_actuals("classifier", [
            {"prediction_id": pred.prediction_id, "actual_label": "a"}])
        assert accepted == 1, msg
        assert second.flush(10)
    finally:
        second.shutdown(2)
    (actual,) = [json.loads(s) for s in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert actual["kind"] == "actual"
    assert (actual["model_name"], actual["prediction_id"]) == (pred.model_name, "req-1:0")
    assert pred.tags["oip_model"] == "iris"  # the request's own model name is kept as a tag
    # With model_name in the config, both use it.
    named = pipeline(tmp_path / "named", model_name="flowers")
    (p2,) = decode(named, *oip(1))
    assert p2.model_name == "flowers"
    assert "model 'flowers'" in named.log_actuals("classifier", [
        {"prediction_id": "x:0", "actual_label": "a"}])[2]
    named.shutdown(1)


# -- item 6 and 14: one id rule -------------------------------------------------------------------


def test_every_record_id_is_request_id_then_index(tmp_path: Path) -> None:
    p = pipeline()
    assert [r.prediction_id for r in decode(p, *oip(1), rid="one")] == ["one:0"]
    assert [r.prediction_id for r in decode(p, *oip(3), rid="three")] == [
        "three:0", "three:1", "three:2"]
    req, resp = oip(2)
    req.id = "inf-9"
    assert [r.prediction_id for r in decode(p, req, resp, rid="w")] == ["w:inf-9:0", "w:inf-9:1"]
    # A user mapper that gives no ids: each record gets its own.
    mod = tmp_path / "idmapper_mod.py"
    mod.write_text("def per_row(request, response, call):\n"
                   "    return [{'features': {'x': i}, 'prediction_label': 'a'} for i in range(3)]"
                   "\n\ndef own(request, response, call):\n"
                   "    return [{'prediction_id': 'mine', 'prediction_label': 'a'}]\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        mapped = pipeline(mapper="idmapper_mod:per_row", methods=[OIP_INFER])
        recs = decode(mapped, *oip(1), rid="req-1")
        assert [r.prediction_id for r in recs] == ["req-1:0", "req-1:1", "req-1:2"]
        own = pipeline(mapper="idmapper_mod:own", methods=[OIP_INFER])
        assert [r.prediction_id for r in decode(own, *oip(1))] == ["mine"]
    finally:
        sys.path.remove(str(tmp_path))


# -- item 7: floats keep their precision ----------------------------------------------------------


def test_fp32_values_are_exact_and_doubles_whole() -> None:
    vals = [16777216.0, 123456792.0, 1.0000001, 0.1, 5.1]
    raw = struct.pack("<5f", *vals)
    got = tensor_values("x", "FP32", [5], None, raw)
    as_f32 = [struct.unpack("<f", struct.pack("<f", v))[0] for v in vals]
    assert [struct.unpack("<f", struct.pack("<f", g))[0] for g in got] == as_f32
    assert got[0] == 16777216.0 and got[2] == 1.0000001 and got[3] == 0.1 and got[4] == 5.1
    assert tensor_values("d", "FP64", [1], None, struct.pack("<d", 1234567.89)) == [1234567.89]
    cfg = parse_config({"applications": [{**IRIS_APP, "prediction_records": {
        "enabled": True, "field_mapping": {
            "features": ["value"], "request_type": "google.protobuf.DoubleValue",
            "response_type": "google.protobuf.FloatValue", "prediction_score": "value"}}}]})
    p = RecordPipeline(cfg, Path("."))
    (r,) = decode(p, wrappers_pb2.DoubleValue(value=1234567.89),
                  wrappers_pb2.FloatValue(value=0.1), method="/x.Y/Z")
    assert r.features == {"value": 1234567.89} and r.prediction_score == 0.1


# -- item 8 and 15: Open Inference tensors --------------------------------------------------------


def test_oip_decodes_what_is_mapped_and_counts_every_loss() -> None:
    bf16 = b"".join(struct.pack("<f", v)[2:] for v in (1.0, 2.5))
    assert tensor_values("t", "BF16", [2], None, bf16) == [1.0, 2.5]
    p = pipeline(field_mapping={"features": ["x"]})
    # An input the mapping does not want, in a datatype nobody can decode: ignored.
    req = pb.ModelInferRequest(inputs=[
        Tensor(name="x", datatype="FP32", shape=[1, 2]),
        Tensor(name="emb", datatype="FP8", shape=[1, 2])],
        raw_input_contents=[struct.pack("<2f", 1.0, 2.0), b"\x01\x02"])
    (rec,) = decode(p, req)
    assert rec.features == {"x_0": 1.0, "x_1": 2.0}
    # A wanted one that cannot be decoded costs its columns, not the call; counted.
    p2 = pipeline()
    req.inputs[1].name = "x2"
    (rec,) = decode(p2, req)
    assert rec.features == {"x_0": 1.0, "x_1": 2.0} and "FP8" in rec.tags["tensors_skipped"]
    assert p2.calls_dropped["tensor_skipped"] == 1
    # A [1] parameter before a [3, 2] batch: three records, the parameter in each.
    req3 = pb.ModelInferRequest(inputs=[
        Tensor(name="threshold", datatype="FP32", shape=[1],
               contents=pb.InferTensorContents(fp32_contents=[0.5])),
        Tensor(name="x", datatype="FP32", shape=[3, 2],
               contents=pb.InferTensorContents(fp32_contents=[1, 2, 3, 4, 5, 6])),
        Tensor(name="odd", datatype="INT32", shape=[2],
               contents=pb.InferTensorContents(int_contents=[7, 8]))])
    resp3 = pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(
        name="label", datatype="BYTES", shape=[3],
        contents=pb.InferTensorContents(bytes_contents=[b"a", b"b", b"c"]))])
    recs = decode(p2, req3, resp3)
    assert [(r.features, r.prediction_label) for r in recs] == [
        ({"threshold": 0.5, "x_0": 1.0, "x_1": 2.0}, "a"),
        ({"threshold": 0.5, "x_0": 3.0, "x_1": 4.0}, "b"),
        ({"threshold": 0.5, "x_0": 5.0, "x_1": 6.0}, "c")]
    assert p2.calls_dropped["tensor_skipped"] == 2  # "odd" has 2 rows of a 3-row batch
    # A 0-row batch: no record, counted.
    req0 = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="FP32", shape=[0, 4])])
    assert decode(p2, req0, code=grpc.StatusCode.INVALID_ARGUMENT) == []
    assert p2.calls_dropped["no_rows"] == 1


def test_rows_over_the_cap_keep_their_features_and_count_each_lost_record() -> None:
    p = pipeline()
    rows = MAX_ROWS_PER_CALL + 3
    recs = decode(p, *oip(rows))
    assert len(recs) == MAX_ROWS_PER_CALL
    assert recs[0].features == {"x_0": 1.0, "x_1": 2.0} and recs[-1].prediction_label == "a"
    assert p.calls_dropped["too_many_rows"] == 3


# -- item 13: too large payloads keep their record ------------------------------------------------


def test_a_payload_over_the_cap_keeps_its_record_without_it(tmp_path: Path) -> None:
    p = pipeline(tmp_path, max_payload_bytes=50)
    p.start()
    try:
        p.observe(call_record(*[m.SerializeToString() for m in oip(40)], rid="big"))
        assert p.flush(10)
    finally:
        p.shutdown(2)
    (line,) = [json.loads(s) for s in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert line["prediction_id"] == "big:0" and line["features"] == {}
    assert line["tags"]["payload_dropped"] == "request larger than max_payload_bytes"
    assert line["tags"]["status_code"] == "OK"
    assert p.calls_dropped["payload_too_large"] == 1


# -- item 12: per-replica series of removed replicas ----------------------------------------------


def test_stopped_replicas_leave_no_series_and_totals_keep_counting() -> None:
    t = Telemetry(MetricsConfig.model_validate({"prometheus": {"enabled": False}}),
                  SimpleNamespace())  # type: ignore[arg-type]
    for i in range(50):  # 50 scale-down/up cycles, one call each on the new replica
        rid = f"classifier#Iris#{i:06x}"
        slot = SimpleNamespace(replica_id=rid, application="classifier", deployment="Iris")
        t.on_replica_event("running", slot)  # type: ignore[arg-type]
        t.observe(CallRecord("classifier", "Iris", rid, OIP_INFER, OIP_INFER,
                             grpc.StatusCode.OK, "", 0.001, time.time(), "r", 1, 1, False))
        t.on_replica_event("stopped", slot)  # type: ignore[arg-type]
    assert t._replica_requests() == []
    latency, processing = t.extra_metrics()[:2]
    assert list(processing.data.data_points) == []
    (total,) = t._requests()
    assert total.value == 50
    assert sum(dp.count for dp in latency.data.data_points) == 50


@pytest.mark.parametrize("reason", ["queue_full", "decode_error", "mapper_error", "no_rows",
                                    "too_many_rows", "tensor_skipped", "payload_too_large"])
def test_every_call_drop_reason_starts_at_zero(reason: str) -> None:
    assert pipeline().snapshot()["calls_dropped"][reason] == 0
