"""The seed's HTTP rows with exact values after known traffic; HTTP calls in the deployment and
replica rows but not in the gRPC proxy's; prediction records from REST calls."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc

from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.http_support import HTTP, PREDICT, ROWS, call, infer_body, iris, text, url
from tests.metrics_util import scrape, scrape_until

INFER = "/iris/v2/models/{model}/infer"
TPREDICT = "/text" + PREDICT


def grpc_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="iris")
    t = req.inputs.add(name="features", datatype="FP32", shape=[len(ROWS), 4])
    t.contents.fp32_contents.extend(v for r in ROWS for v in r)
    return req


async def test_http_rows_exact_after_known_traffic(start_gateway: Any) -> None:
    async with start_gateway([iris(), text()], http=HTTP) as gw:
        for _ in range(3):
            r = await call("POST", url(gw, "/iris/v2/models/iris/infer"), json=infer_body())
            assert r.status_code == 200
        for _ in range(2):
            r = await call("POST", url(gw, TPREDICT), json={"text": "x", "failCode": 13})
            assert r.status_code == 500
        assert (await call("POST", url(gw, TPREDICT), data=b"{")).status_code == 400
        assert (await call("GET", url(gw, "/nope/at/all"))).status_code == 404
        assert (await call("GET", url(gw, "/v2/health/live"))).status_code == 200
        async with grpc.aio.insecure_channel(gw.address) as ch:
            await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                grpc_request(), metadata=(("application", "classifier"),), timeout=10)
        s = await scrape_until(gw, lambda s: bool(s.series(
            "ray_serve_deployment_request_counter_total")))

    requests = s.series("ray_serve_num_http_requests_total")
    assert requests == {
        frozenset({("route", INFER), ("method", "POST"), ("application", "classifier"),
                   ("status_code", "200")}): 3.0,
        frozenset({("route", TPREDICT), ("method", "POST"), ("application", "text"),
                   ("status_code", "500")}): 2.0,
        frozenset({("route", TPREDICT), ("method", "POST"), ("application", "text"),
                   ("status_code", "400")}): 1.0,
        frozenset({("route", "other"), ("method", "GET"), ("application", "unknown"),
                   ("status_code", "404")}): 1.0,
        frozenset({("route", "/v2/health/live"), ("method", "GET"),
                   ("application", "unknown"), ("status_code", "200")}): 1.0,
    }
    assert s.series("ray_serve_num_http_error_requests_total") == {
        frozenset({("route", TPREDICT), ("error_code", "500"), ("method", "POST"),
                   ("application", "text")}): 2.0,
        frozenset({("route", TPREDICT), ("error_code", "400"), ("method", "POST"),
                   ("application", "text")}): 1.0,
        frozenset({("route", "other"), ("error_code", "404"), ("method", "GET"),
                   ("application", "unknown")}): 1.0,
    }
    assert s.series("ray_serve_num_deployment_http_error_requests_total") == {
        frozenset({("deployment", "TextModel"), ("error_code", "500"), ("method", "POST"),
                   ("route", TPREDICT), ("application", "text")}): 2.0,
        frozenset({("deployment", "TextModel"), ("error_code", "400"), ("method", "POST"),
                   ("route", TPREDICT), ("application", "text")}): 1.0,
    }
    assert s.get("ray_serve_http_request_latency_ms_count", route=INFER, method="POST",
                 application="classifier", status_code="200") == 3.0
    (ongoing,) = s.series("ray_serve_num_ongoing_http_requests").items()
    assert {k for k, _ in ongoing[0]} == {"node_id", "node_ip_address"} and ongoing[1] == 0
    # The gRPC proxy's rows count the one gRPC call only...
    assert s.series("ray_serve_num_grpc_requests_total") == {frozenset({
        ("application", "classifier"), ("method", "/inference.GRPCInferenceService/ModelInfer"),
        ("route", "classifier"), ("status_code", "OK")}): 1.0}
    assert sum(s.series("ray_serve_grpc_request_latency_ms_count").values()) == 1.0
    # ...while the deployment and replica rows count both doors.
    by_dep: dict[str, float] = {}
    for labels, v in s.series("ray_serve_deployment_request_counter_total").items():
        dep = dict(labels)["deployment"]
        by_dep[dep] = by_dep.get(dep, 0) + v
    assert by_dep == {"Iris": 4.0, "TextModel": 2.0}  # the bad JSON never reached a replica
    errors = sum(s.series("ray_serve_deployment_error_counter_total").values())
    assert errors == 2.0


async def test_ongoing_gauges_split_http_and_grpc(start_gateway: Any) -> None:
    async with start_gateway([text(None)], http=HTTP) as gw:
        slow = asyncio.ensure_future(call("POST", url(gw, PREDICT),
                                          json={"text": "x", "sleepS": 2.0}))

        def one_http(s: Any) -> bool:
            return list(s.series("ray_serve_num_ongoing_http_requests").values()) == [1.0]

        s = await scrape_until(gw, one_http)
        assert one_http(s)
        assert list(s.series("ray_serve_num_ongoing_grpc_requests").values()) == [0.0]
        assert (await slow).status_code == 200
        s = await scrape(gw)
        assert list(s.series("ray_serve_num_ongoing_http_requests").values()) == [0.0]


async def test_records_from_rest_calls_match_grpc_ones(
    start_gateway: Any, tmp_path: Path
) -> None:
    app = iris(prediction_records={
        "enabled": True, "model_name": "iris", "model_version": "1",
        "field_mapping": {"column_names": {"features": ["a", "b", "c", "d"]}}})
    app["prediction_records"] = app["deployments"][0].pop("prediction_records")
    async with start_gateway([app], http=HTTP, records={"flush_interval_s": 0.05}) as gw:
        r = await call("POST", url(gw, "/iris/v2/models/iris/infer"), json=infer_body(),
                       headers={"x-request-id": "rest-1"})
        assert r.status_code == 200
        async with grpc.aio.insecure_channel(gw.address) as ch:
            await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                grpc_request(), metadata=(("x-request-id", "grpc-1"),), timeout=10)
        ok = await asyncio.get_running_loop().run_in_executor(None, gw.records.flush, 15)
        assert ok
    lines = [json.loads(s) for s in (tmp_path / "logs" / "records.jsonl").read_text()
             .splitlines()]
    by_id = {d["prediction_id"]: d for d in lines if d["kind"] == "prediction"}
    assert set(by_id) == {"rest-1:0", "rest-1:1", "grpc-1:0", "grpc-1:1"}
    for row in (0, 1):
        rest, grpc_rec = by_id[f"rest-1:{row}"], by_id[f"grpc-1:{row}"]
        assert set(rest) == set(grpc_rec)
        for key in ("features", "prediction_label", "prediction_score", "model_name",
                    "model_version"):
            assert rest[key] == grpc_rec[key], key
        assert set(rest["tags"]) == set(grpc_rec["tags"])
        assert rest["tags"]["request_id"] == "rest-1"
        for key in set(rest["tags"]) - {"request_id", "latency_ms"}:
            assert rest["tags"][key] == grpc_rec["tags"][key], key


async def test_a_client_leaving_mid_stream_is_499_and_nothing_leaks(start_gateway: Any) -> None:
    async with start_gateway([text(None)], http=HTTP) as gw:
        assert gw.http is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
        body = b'{"text": "a", "repeat": 3, "sleepS": 1.5}'
        writer.write(b"POST /demo.text.TextModel/PredictStream HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"}}\n"), 10)
        assert first.startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
        route = "/demo.text.TextModel/PredictStream"
        # Both rows: one scrape reads the proxy's counters before the HTTP rows, so a call
        # that ends mid-scrape can show in the second and not yet in the first.
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_num_http_requests_total", route=route, method="POST",
            application="text", status_code="499") == 1.0 and bool(
            s.series("ray_serve_deployment_request_counter_total")))
        assert s.get("ray_serve_num_http_requests_total", route=route, method="POST",
                     application="text", status_code="499") == 1.0
        assert gw.http.in_proxy == 0 and gw.proxy.ongoing == 0
        assert list(s.series("ray_serve_num_ongoing_http_requests").values()) == [0.0]
        # Found when the next message could not be written: the call counts once.
        assert sum(s.series("ray_serve_deployment_request_counter_total").values()) == 1.0
