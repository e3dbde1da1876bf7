"""Rows of an OIP call's records come from its batch dimension: an extra input whose first
dimension disagrees does not multiply them (REST and gRPC alike)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc

from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.records.tensors import _Tensor, batch_rows
from tests.http_support import HTTP, call, iris, url


def t(rows: int, per_row: int) -> _Tensor:
    return _Tensor("x", rows, per_row, [0.0] * (rows * per_row))


def test_batch_rows_rule() -> None:
    assert batch_rows([t(1, 4), t(2, 1)], [t(1, 1), t(1, 3)]) == 1  # the answer decides
    assert batch_rows([t(1, 4), t(2, 1)], []) == 1  # a tie: the smaller
    assert batch_rows([t(8, 4), t(1, 1)], []) == 8  # a [1] input is shared, not a vote
    assert batch_rows([t(8, 4), t(8, 2), t(3, 1)], [t(8, 1)]) == 8
    assert batch_rows([t(8, 4)], [t(8, 1), t(3, 1), t(3, 1)]) == 8  # no input has 3
    assert batch_rows([t(1, 1)], [t(5, 1)]) == 5
    assert batch_rows([], []) == 1


async def test_an_extra_input_does_not_multiply_records(
    start_gateway: Any, tmp_path: Path
) -> None:
    app = iris(prediction_records={"enabled": True, "model_name": "iris",
                                   "model_version": "1"})
    app["prediction_records"] = app["deployments"][0].pop("prediction_records")
    extra = {"name": "extra", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2]}, extra]}
    async with start_gateway([app], http=HTTP, records={"flush_interval_s": 0.05}) as gw:
        r = await call("POST", url(gw, "/iris/v2/models/iris/infer"), json=body,
                       headers={"x-request-id": "rest-x"})
        assert r.status_code == 200, r.text
        req = pb.ModelInferRequest(model_name="iris")
        f = req.inputs.add(name="features", datatype="FP32", shape=[1, 4])
        f.contents.fp32_contents.extend([5.1, 3.5, 1.4, 0.2])
        e = req.inputs.add(name="extra", datatype="FP32", shape=[2])
        e.contents.fp32_contents.extend([1.0, 2.0])
        async with grpc.aio.insecure_channel(gw.address) as ch:
            await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                req, metadata=(("x-request-id", "grpc-x"),), timeout=10)
        ok = await asyncio.get_running_loop().run_in_executor(None, gw.records.flush, 15)
        assert ok
    lines = [json.loads(s) for s in (tmp_path / "logs" / "records.jsonl").read_text()
             .splitlines()]
    preds = {d["prediction_id"]: d for d in lines if d["kind"] == "prediction"}
    assert set(preds) == {"rest-x:0", "grpc-x:0"}, sorted(preds)
    for rec in preds.values():
        assert rec["prediction_label"] is not None
        assert "extra_0" not in rec["features"] and "extra" not in rec["features"]
