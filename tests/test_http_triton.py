"""Triton's own clients (tritonclient gRPC and HTTP) read every output of the demo's `iris`
model through the gateway; the OIP answer helper answers in the request's form."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from examples.models import classify
from gateway.oip import Tensor, infer_response
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.records.tensors import tensor_values
from tests.http_support import HTTP, ROWS, iris, text

SCRIPT = Path(__file__).with_name("triton_clients.py")
LABELS = [classify(r)[0] for r in ROWS]
SCORES = [classify(r)[1] for r in ROWS]


async def test_triton_clients_read_every_output(start_gateway: Any) -> None:
    # Two applications: the clients name one with the `application` header.
    async with start_gateway([iris(), text()], http=HTTP) as gw:
        assert gw.http is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), gw.address, f"127.0.0.1:{gw.http.port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()[-3000:]
    got = json.loads(out)
    live, ready, (label, score), (no_label, only_score) = got["grpc"]
    assert live and ready
    assert label == [*LABELS, "object"]
    assert score[-1] == "float32" and score[:-1] == pytest.approx(SCORES, rel=1e-6)
    assert no_label is None and only_score[:-1] == pytest.approx(SCORES, rel=1e-6)
    live, ready, model_ready, outputs, *answers = got["http"]
    assert live and ready and model_ready and [o["name"] for o in outputs] == ["label", "score"]
    assert len(answers) == 6
    for label, score in answers:
        assert label[:-1] == LABELS
        assert score[-1] == "float32" and score[:-1] == pytest.approx(SCORES, rel=1e-6)


def _request(raw: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", id="r1")
    t = req.inputs.add(name="x", datatype="FP32", shape=[2])
    if raw:
        req.raw_input_contents.append(struct.pack("<2f", 1.0, 2.0))
    else:
        t.contents.fp32_contents.extend([1.0, 2.0])
    return req


def test_infer_response_answers_in_the_requests_form() -> None:
    outs = [Tensor("label", "BYTES", [2], [b"a", "bc"]), Tensor("score", "FP32", [2], [0.5, 1]),
            Tensor("n", "INT64", [1, 2], [3, -4], {"unit": "count"})]
    typed = infer_response(_request(False), outs, model_version="1")
    assert not typed.raw_output_contents and typed.id == "r1" and typed.model_name == "m"
    assert list(typed.outputs[0].contents.bytes_contents) == [b"a", b"bc"]
    assert list(typed.outputs[2].contents.int64_contents) == [3, -4]
    assert typed.outputs[2].parameters["unit"].string_param == "count"
    raw = infer_response(_request(True), outs)
    assert len(raw.raw_output_contents) == 3
    assert not raw.outputs[0].HasField("contents")
    assert raw.raw_output_contents[0] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    # Records (and the HTTP ingress) read both forms to the same values.
    for resp in (typed, raw):
        rows = [tensor_values(t.name, t.datatype, list(t.shape), t.contents,
                              resp.raw_output_contents[i] if resp.raw_output_contents else None)
                for i, t in enumerate(resp.outputs)]
        assert rows == [["a", "bc"], [0.5, 1.0], [3, -4]]
    # FP16 has no typed field: the whole answer goes raw (all outputs raw or none).
    half = infer_response(_request(False), [*outs, Tensor("h", "FP16", [1], [0.5])])
    assert len(half.raw_output_contents) == 4
    # Only what the request asks for.
    req = _request(False)
    req.outputs.add(name="score")
    assert [o.name for o in infer_response(req, outs).outputs] == ["score"]
    with pytest.raises(ValueError, match="3 values for shape"):
        infer_response(_request(False), [Tensor("s", "FP32", [2], [1, 2, 3])])
