"""OTLP push to real receivers run by the test (gRPC and HTTP/protobuf), decoded on arrival."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2

from gateway.config import MetricsConfig
from tests.conftest import PredictRequest, external_replica, md, text_stub

PREDICT = "/demo.text.TextModel/Predict"
Request = metrics_service_pb2.ExportMetricsServiceRequest


class GrpcReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.metadata: list[dict[str, str]] = []

    async def Export(
        self, request: Request, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        return metrics_service_pb2.ExportMetricsServiceResponse()


class HttpReceiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.metadata: list[dict[str, str]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.paths.append(self.path)
                outer.metadata.append({k.lower(): v for k, v in self.headers.items()})
                outer.requests.append(Request.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(metrics_service_pb2.ExportMetricsServiceResponse()
                                 .SerializeToString())

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def metrics_of(req: Request) -> dict[str, metrics_pb2.Metric]:
    return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics}


def attrs(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


async def wait_for(pred: Callable[[], bool], timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        await asyncio.sleep(0.1)


def requests_total(reqs: list[Request], status: str) -> int:
    """The cumulative count of the latest export that has it (0 if none yet)."""
    for req in reversed(reqs):
        m = metrics_of(req).get("ray_serve_num_grpc_requests")
        if m is None:
            continue
        for p in m.sum.data_points:
            if attrs(p).get("status_code") == status:
                return int(p.as_int)
    return 0


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    server = HttpReceiver()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_otlp_push_arrives_decoded(
    start_gateway: Any, http_receiver: HttpReceiver, protocol: str
) -> None:
    grpc_receiver = GrpcReceiver()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(grpc_receiver, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    receiver: GrpcReceiver | HttpReceiver = grpc_receiver
    endpoint = f"http://127.0.0.1:{grpc_port}"
    if protocol != "grpc":
        receiver = http_receiver
        endpoint = f"http://127.0.0.1:{http_receiver.server_address[1]}"
    otlp = {"enabled": True, "endpoint": endpoint, "protocol": protocol, "interval_s": 0.3,
            "timeout_s": 2, "headers": {"x-collector-token": "s3cret"}}
    try:
        async with external_replica() as (_, port):
            app = {"name": "ext", "deployments": [{"name": "E",
                                                   "targets": [f"127.0.0.1:{port}"]}]}
            async with start_gateway([app], metrics={"otlp": otlp}) as gw, \
                    grpc.aio.insecure_channel(gw.address) as ch:
                for _ in range(4):
                    await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md("ext"))
                with pytest.raises(grpc.aio.AioRpcError):
                    await text_stub(ch).Predict(PredictRequest(fail_code=3), metadata=md("ext"))
                await wait_for(lambda: requests_total(receiver.requests, "INVALID_ARGUMENT") == 1
                               and requests_total(receiver.requests, "OK") == 4)
    finally:
        await server.stop(0)

    assert requests_total(receiver.requests, "OK") == 4
    assert receiver.metadata[-1]["x-collector-token"] == "s3cret"
    if isinstance(receiver, HttpReceiver):
        assert set(receiver.paths) == {"/v1/metrics"}
    # The first export after the traffic (the last one, at shutdown, has no replicas left).
    req = next(r for r in receiver.requests if requests_total([r], "INVALID_ARGUMENT") == 1)
    res = {kv.key: kv.value.string_value for kv in req.resource_metrics[0].resource.attributes}
    assert res["service.name"] == "grpc-gateway"
    ms = metrics_of(req)

    total = ms["ray_serve_num_grpc_requests"]
    assert total.sum.is_monotonic
    assert total.sum.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    ok = next(p for p in total.sum.data_points if attrs(p)["status_code"] == "OK")
    assert attrs(ok) == {"application": "ext", "method": PREDICT, "route": "ext",
                         "status_code": "OK"}

    lat = ms["ray_serve_grpc_request_latency_ms"]
    assert lat.unit == ""  # the name carries the unit, as in Ray
    (p,) = [p for p in lat.histogram.data_points if attrs(p)["status_code"] == "OK"]
    assert p.count == 4 and sum(p.bucket_counts) == 4 and p.sum > 0
    assert list(p.explicit_bounds) == MetricsConfig().latency_buckets_ms
    assert p.start_time_unix_nano <= p.time_unix_nano

    dur = ms["grpc.server.call.duration"]
    assert dur.unit == "s"
    by_status = {attrs(p)["grpc.status"]: p.count for p in dur.histogram.data_points}
    assert by_status == {"OK": 4, "INVALID_ARGUMENT": 1}
    assert ms["grpc.server.call.sent_total_compressed_message_size"].unit == "By"
    started = ms["grpc.server.call.started"]
    assert [(attrs(p), p.as_int) for p in started.sum.data_points] == [
        ({"grpc.method": PREDICT.lstrip("/")}, 5)]
    healthy = ms["ray_serve_deployment_replica_healthy"]
    assert [p.as_int for p in healthy.gauge.data_points] == [1]


async def test_collector_down_never_fails_a_call(start_gateway: Any) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens once closed
    otlp = {"enabled": True, "endpoint": f"http://127.0.0.1:{dead}", "interval_s": 0.2,
            "timeout_s": 0.5}
    async with external_replica() as (_, port):
        app = {"name": "ext", "deployments": [{"name": "E", "targets": [f"127.0.0.1:{port}"]}]}
        async with start_gateway([app], metrics={"otlp": otlp}) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            assert gw.telemetry is not None
            (exp,) = [e for e in gw.telemetry.exporters if e.name == "otlp"]
            for _ in range(3):
                r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md("ext"))
                assert r.label == "positive"
            await wait_for(lambda: exp.exporter.failures >= 1)  # type: ignore[attr-defined]
            assert exp.exporter.failures >= 1  # type: ignore[attr-defined]
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 10  # stopping does not hang on the dead collector
