"""Metrics end to end: real traffic through a real gateway, then a real scrape of /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import grpc
import pytest

from exporters.metrics.otlp import OTLPExporter
from exporters.metrics.prometheus import PrometheusExporter
from gateway.app import Gateway
from gateway.control.controller import ReplicaSlot
from gateway.metrics.aggregate import UNKNOWN_APPLICATION, CallAggregate
from gateway.metrics.exporter import load_exporter_class
from gateway.metrics.telemetry import Telemetry
from tests.conftest import TEXT_APP, PredictRequest, external_replica, md, text_stub
from tests.metrics_util import Scrape, scrape, scrape_until

PREDICT = "/demo.text.TextModel/Predict"
BOUNDS_MS = [0.5, 1, 5, 50, 1000, 60000]

# Exact label sets, as Ray Serve 2.60 exposes them (see the captured sample in shared/reference).
LABELS: dict[str, set[str]] = {
    "ray_serve_num_grpc_requests_total": {"application", "method", "route", "status_code"},
    "ray_serve_num_grpc_error_requests_total": {"application", "error_code", "method", "route"},
    "ray_serve_num_deployment_grpc_error_requests_total": {
        "application", "deployment", "error_code", "method", "route"},
    "ray_serve_grpc_request_latency_ms_count": {"application", "method", "route", "status_code"},
    "ray_serve_grpc_request_latency_ms_bucket": {
        "application", "method", "route", "status_code", "le"},
    "ray_serve_num_ongoing_grpc_requests": {"node_id", "node_ip_address"},
    "ray_serve_num_router_requests_total": {
        "actor_id", "application", "deployment", "handle", "route"},
    "ray_serve_deployment_queued_queries": {"actor_id", "application", "deployment", "handle"},
    "ray_serve_num_scheduling_tasks": {
        "actor_id", "app", "application", "deployment", "handle_source"},
    "ray_serve_num_scheduling_tasks_in_backoff": {
        "actor_id", "app", "application", "deployment", "handle_source"},
    "ray_serve_deployment_request_counter_total": {"application", "deployment", "replica", "route"},
    "ray_serve_deployment_error_counter_total": {"application", "deployment", "replica", "route"},
    "ray_serve_deployment_processing_latency_ms_count": {
        "application", "deployment", "replica", "route"},
    "ray_serve_replica_processing_queries": {"application", "deployment", "replica"},
    "ray_serve_replica_pending_queries": {"application", "deployment", "replica"},
    "ray_serve_deployment_replica_starts_total": {"application", "deployment", "replica"},
    "ray_serve_deployment_replica_healthy": {"application", "deployment", "replica"},
    "ray_serve_handle_request_counter_total": {"application", "deployment", "handle", "route"},
    "ray_component_rss_mb": {"Component", "ip", "pid"},
    "ray_component_mem_shared_bytes": {"Component", "ip", "pid"},
    "ray_component_cpu_percentage": {"Component", "ip", "pid"},
    "grpc_server_call_started_total": {"grpc_method"},
    "grpc_server_call_duration_seconds_count": {"grpc_method", "grpc_status"},
    "grpc_server_call_sent_total_compressed_message_size_bytes_sum": {
        "grpc_method", "grpc_status"},
    "grpc_server_call_rcvd_total_compressed_message_size_bytes_sum": {
        "grpc_method", "grpc_status"},
}


def only_slot(gw: Gateway, app: str) -> ReplicaSlot:
    (slot,) = [s for _, s in gw.controller.slots() if s.application == app]
    return slot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def requests_(s: Scrape, app: str, status: str, method: str = PREDICT) -> float | None:
    return s.get("ray_serve_num_grpc_requests_total", application=app, method=method, route=app,
                 status_code=status)


async def test_catalogue_after_real_traffic(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP], metrics={"latency_buckets_ms": BOUNDS_MS}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        sent = rcvd = 0
        for text in ("good", "bad movie", "great great love"):
            req = PredictRequest(text=text)
            resp = await stub.Predict(req, metadata=md())
            rcvd += req.ByteSize()
            sent += resp.ByteSize()
        bad = stub.Predict(PredictRequest(text="x", fail_code=3), metadata=md())
        assert await code_of(bad) is grpc.StatusCode.INVALID_ARGUMENT
        for name in ("nope", "also-nope", "x" * 300):  # never label values of their own
            call = stub.Predict(PredictRequest(text="x"), metadata=md(name))
            assert await code_of(call) is grpc.StatusCode.NOT_FOUND
        cancelled = stub.Predict(PredictRequest(sleep_s=5), metadata=md())
        await asyncio.sleep(0.3)
        cancelled.cancel()
        # A method no loaded proto knows: recorded as `other`.
        unknown = ch.unary_unary("/demo.text.TextModel/Made" + "Up")(b"", metadata=md())
        assert await code_of(unknown) is grpc.StatusCode.UNIMPLEMENTED

        s = await scrape_until(gw, lambda s: requests_(s, "text", "CANCELLED") == 1)
        slot = only_slot(gw, "text")
        rep = slot.replica_id

        for name, keys in LABELS.items():
            assert s.label_keys(name) == {frozenset(keys)}, name

        # Proxy-level requests, errors and latency, one series per (app, method, status).
        expect = {("text", "OK"): 3, ("text", "INVALID_ARGUMENT"): 1, ("text", "CANCELLED"): 1,
                  (UNKNOWN_APPLICATION, "NOT_FOUND"): 3}
        for (app, status), n in expect.items():
            assert requests_(s, app, status) == n, (app, status)
            lat = {"application": app, "method": PREDICT, "route": app, "status_code": status}
            assert s.get("ray_serve_grpc_request_latency_ms_count", **lat) == n
            assert s.get("ray_serve_grpc_request_latency_ms_bucket", **lat, le="+Inf") == n
            assert s.get("ray_serve_grpc_request_latency_ms_sum", **lat) > 0  # type: ignore[operator]
            if status != "OK":
                err = {"application": app, "error_code": status, "method": PREDICT, "route": app}
                assert s.get("ray_serve_num_grpc_error_requests_total", **err) == n
        assert requests_(s, "text", "UNIMPLEMENTED", method="other") == 1
        assert len(s.series("ray_serve_num_grpc_requests_total")) == 5
        assert s.get("ray_serve_num_grpc_error_requests_total", application="text",
                     error_code="OK", method=PREDICT, route="text") is None
        apps = {dict(k)["application"] for k in s.series("ray_serve_num_grpc_requests_total")}
        assert apps == {"text", UNKNOWN_APPLICATION}

        # The configured, sub-millisecond buckets.
        les = sorted(float(dict(k)["le"]) for k in s.where(
            "ray_serve_grpc_request_latency_ms_bucket", status_code="OK"))
        assert les == [*BOUNDS_MS, float("inf")]
        assert s.get("ray_serve_grpc_request_latency_ms_bucket", application="text",
                     method=PREDICT, route="text", status_code="CANCELLED", le="50.0") == 0

        # Deployment errors: every non-OK status of a routed call (not the unknown app's).
        dep_err = s.series("ray_serve_num_deployment_grpc_error_requests_total")
        assert {dict(k)["error_code"]: v for k, v in dep_err.items()} == {
            "INVALID_ARGUMENT": 1, "CANCELLED": 1, "UNIMPLEMENTED": 1}

        # Router and handle: the 6 calls for the application's deployment.
        (router,) = s.series("ray_serve_num_router_requests_total").items()
        assert router[1] == 6 and dict(router[0])["deployment"] == "TextModel"
        handle = dict(router[0])["handle"]
        assert s.get("ray_serve_handle_request_counter_total", application="text",
                     deployment="TextModel", handle=f"text#TextModel#{handle}", route="text") == 6

        # Replica level: 5 reached it (the gateway answered the made-up method itself); one
        # was its own error: a client's cancel is not the replica failing.
        rl = {"application": "text", "deployment": "TextModel", "replica": rep}
        assert s.get("ray_serve_deployment_request_counter_total", **rl, route="text") == 5
        assert s.get("ray_serve_deployment_error_counter_total", **rl, route="text") == 1
        assert s.get("ray_serve_deployment_processing_latency_ms_count", **rl, route="text") == 5
        assert s.get("ray_serve_deployment_replica_starts_total", **rl) == 1
        assert s.get("ray_serve_deployment_replica_healthy", **rl) == 1
        assert s.get("ray_serve_replica_processing_queries", **rl) == 0
        assert s.get("ray_serve_replica_pending_queries", **rl) == 0

        # gRFC A66.
        assert s.get("grpc_server_call_started_total", grpc_method=PREDICT.lstrip("/")) == 8
        assert s.get("grpc_server_call_started_total", grpc_method="other") == 1
        a66 = {"grpc_method": PREDICT.lstrip("/"), "grpc_status": "OK"}
        assert s.get("grpc_server_call_duration_seconds_count", **a66) == 3
        dur = s.get("grpc_server_call_duration_seconds_sum", **a66)
        lat_ms = s.get("ray_serve_grpc_request_latency_ms_sum", application="text",
                       method=PREDICT, route="text", status_code="OK")
        assert dur is not None and lat_ms is not None
        assert dur == pytest.approx(lat_ms / 1000)
        assert s.get("grpc_server_call_sent_total_compressed_message_size_bytes_sum", **a66) == sent
        assert s.get("grpc_server_call_rcvd_total_compressed_message_size_bytes_sum", **a66) == rcvd
        assert s.get("grpc_server_call_duration_seconds_bucket", **a66, le="0.0") == 0
        assert s.types["grpc_server_call_duration_seconds"] == "histogram"

        # Memory of the gateway and of the replica process.
        rss = s.series("ray_component_rss_mb")
        by_pid = {dict(k)["pid"]: (dict(k)["Component"], v) for k, v in rss.items()}
        assert by_pid[str(os.getpid())][0] == "ray::ProxyActor"
        assert by_pid[str(slot.pid)][0] == "ray::ServeReplica:text:TextModel"
        assert all(10 < mb < 10_000 for _, mb in by_pid.values())
        shared = s.where("ray_component_mem_shared_bytes", pid=str(slot.pid))
        assert len(shared) == 1 and next(iter(shared.values())) > 0
        # CPU since the previous scrape, for the gateway and the replica (Ray's name and labels).
        for _ in range(50):
            await stub.Predict(PredictRequest(text="good"), metadata=md())
        cpu = {dict(k)["pid"]: (dict(k)["Component"], v)
               for k, v in (await scrape(gw)).series("ray_component_cpu_percentage").items()}
        assert cpu[str(os.getpid())][0] == "ray::ProxyActor"
        assert cpu[str(slot.pid)][0] == "ray::ServeReplica:text:TextModel"
        assert cpu[str(os.getpid())][1] > 0 and cpu[str(slot.pid)][1] > 0

        # Nothing in flight any more.
        assert s.series("ray_serve_num_ongoing_grpc_requests") and all(
            v == 0 for v in s.series("ray_serve_num_ongoing_grpc_requests").values())

        # A crash: the controller restarts the replica; starts counts it, memory follows it.
        old_pid = slot.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_deployment_replica_starts_total", **rl) == 2 and s.get(
            "ray_serve_deployment_replica_healthy", **rl) == 1, timeout=30)
        assert s.get("ray_serve_deployment_replica_starts_total", **rl) == 2
        assert s.get("ray_serve_deployment_replica_healthy", **rl) == 1
        pids = {dict(k)["pid"] for k in s.series("ray_component_rss_mb")}
        assert str(old_pid) not in pids and str(slot.pid) in pids


async def test_ongoing_and_queued_while_saturated(start_gateway: Any) -> None:
    async with external_replica() as (_, port):
        busy = {"name": "busy", "deployments": [{
            "name": "Ext", "targets": [f"127.0.0.1:{port}"], "max_ongoing_requests": 1,
            "max_queued_requests": 5}]}
        full = {"name": "full", "deployments": [{
            "name": "Ext", "targets": [f"127.0.0.1:{port}"], "max_ongoing_requests": 1,
            "max_queued_requests": 0}]}
        async with start_gateway([busy, full]) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            stub = text_stub(ch)
            slow = [stub.Predict(PredictRequest(sleep_s=1.0), metadata=md("busy"))
                    for _ in range(3)]
            queued = {"actor_id": gw.telemetry.actor_id if gw.telemetry else "",
                      "application": "busy", "deployment": "Ext"}

            def saturated(s: Scrape) -> bool:
                q = s.where("ray_serve_deployment_queued_queries", **queued)
                return list(q.values()) == [2]

            s = await scrape_until(gw, saturated)
            assert list(s.where("ray_serve_deployment_queued_queries", **queued).values()) == [2]
            sched = {"application": "busy", "app": "busy", "deployment": "Ext",
                     "handle_source": "PROXY"}
            assert list(s.where("ray_serve_num_scheduling_tasks", **sched).values()) == [2]
            assert list(s.where("ray_serve_num_scheduling_tasks_in_backoff",
                                **sched).values()) == [2]
            assert list(s.series("ray_serve_num_ongoing_grpc_requests").values()) == [3]
            rl = {"application": "busy", "deployment": "Ext",
                  "replica": only_slot(gw, "busy").replica_id}
            assert s.get("ray_serve_replica_processing_queries", **rl) == 1

            # The other deployment queues nothing: a second concurrent call is refused.
            first = stub.Predict(PredictRequest(sleep_s=0.5), metadata=md("full"))
            await asyncio.sleep(0.1)
            second = stub.Predict(PredictRequest(), metadata=md("full"))
            assert await code_of(second) is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await code_of(first) is grpc.StatusCode.OK
            for call in slow:
                assert await code_of(call) is grpc.StatusCode.OK

            s = await scrape_until(gw, lambda s: list(
                s.series("ray_serve_num_ongoing_grpc_requests").values()) == [0])
            assert list(s.series("ray_serve_num_ongoing_grpc_requests").values()) == [0]
            assert list(s.where("ray_serve_deployment_queued_queries", **queued).values()) == [0]
            assert requests_(s, "busy", "OK") == 3
            assert requests_(s, "full", "RESOURCE_EXHAUSTED") == 1
            assert s.get("ray_serve_num_deployment_grpc_error_requests_total",
                         application="full", deployment="Ext", error_code="RESOURCE_EXHAUSTED",
                         method=PREDICT, route="full") == 1
            # Refused by the gateway before any replica: not a replica's request or error.
            rl_full = {"application": "full", "deployment": "Ext",
                       "replica": only_slot(gw, "full").replica_id, "route": "full"}
            assert s.get("ray_serve_deployment_request_counter_total", **rl_full) == 1
            assert s.get("ray_serve_deployment_error_counter_total", **rl_full) is None


async def test_unavailable_and_replica_health(start_gateway: Any) -> None:
    port = free_port()  # nothing listens here yet
    down = {"name": "down", "deployments": [{
        "name": "Ext", "targets": [f"127.0.0.1:{port}"], "health_check_period_s": 0.2,
        "health_check_timeout_s": 0.5}]}
    async with start_gateway([down]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        rl = {"application": "down", "deployment": "Ext",
              "replica": only_slot(gw, "down").replica_id}
        s = await scrape_until(
            gw, lambda s: s.get("ray_serve_deployment_replica_healthy", **rl) == 0)
        assert s.get("ray_serve_deployment_replica_healthy", **rl) == 0
        for _ in range(2):
            call = text_stub(ch).Predict(PredictRequest(text="x"), metadata=md("down"))
            assert await code_of(call) is grpc.StatusCode.UNAVAILABLE

        async with external_replica(port=port):
            s = await scrape_until(
                gw, lambda s: s.get("ray_serve_deployment_replica_healthy", **rl) == 1)
            assert s.get("ray_serve_deployment_replica_healthy", **rl) == 1
            r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md("down"))
            assert r.label == "positive"

        s = await scrape_until(
            gw, lambda s: s.get("ray_serve_deployment_replica_healthy", **rl) == 0)
        assert s.get("ray_serve_deployment_replica_healthy", **rl) == 0
        assert requests_(s, "down", "UNAVAILABLE") == 2
        assert requests_(s, "down", "OK") == 1
        assert s.get("ray_serve_num_grpc_error_requests_total", application="down",
                     error_code="UNAVAILABLE", method=PREDICT, route="down") == 2
        # External replicas have no process of ours: only the gateway's memory is reported.
        assert {dict(k)["Component"] for k in s.series("ray_component_rss_mb")} == {
            "ray::ProxyActor"}


async def test_disabled_metrics_record_nothing(start_gateway: Any) -> None:
    async with external_replica() as (_, port):
        app = {"name": "ext", "deployments": [{"name": "E", "targets": [f"127.0.0.1:{port}"]}]}
        async with start_gateway([app], metrics={"enabled": False}) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            assert gw.telemetry is None and gw.metrics_port is None
            assert not any(isinstance(getattr(o, "__self__", None), (Telemetry, CallAggregate))
                           for o in gw.proxy.observers)
            assert not any(isinstance(getattr(o, "__self__", None), Telemetry)
                           for o in gw.controller.listeners)
            r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md("ext"))
            assert r.label == "positive"


async def test_metrics_port_in_use_is_a_clear_error(start_gateway: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            async with start_gateway([], metrics={"prometheus": {"port": port}}):
                pass


async def test_prometheus_can_be_turned_off(start_gateway: Any) -> None:
    async with start_gateway([], metrics={"prometheus": {"enabled": False}}) as gw:
        assert gw.telemetry is not None and gw.metrics_port is None


def test_metric_exporters_resolve_through_entry_points() -> None:
    assert load_exporter_class("prometheus") is PrometheusExporter
    assert load_exporter_class("otlp") is OTLPExporter
    with pytest.raises(LookupError, match="no metric exporter named 'nope'"):
        load_exporter_class("nope")


async def test_observer_never_breaks_on_odd_records(start_gateway: Any) -> None:
    """A record of a call that failed before routing (empty ids, zero sizes) still counts."""
    from gateway.dataplane.proxy import CallRecord

    async with start_gateway([]) as gw:
        assert gw.telemetry is not None
        gw.telemetry.observe(CallRecord("", "", "", "/x.Y/Z", "other", grpc.StatusCode.UNKNOWN,
                                        "", 0.0, 0.0, "", 0, 0, True))
        s = await scrape(gw)
        assert requests_(s, UNKNOWN_APPLICATION, "UNKNOWN", method="other") == 1
        assert s.get("ray_serve_deployment_request_counter_total") is None


async def test_deadline_exceeded(start_gateway: Any) -> None:
    async with external_replica() as (_, port):
        app = {"name": "ext", "deployments": [{"name": "E", "targets": [f"127.0.0.1:{port}"]}]}
        async with start_gateway([app], proxy={"request_timeout_s": 0.3}) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            # No client deadline: the gateway's own request timeout runs out upstream.
            call = text_stub(ch).Predict(PredictRequest(sleep_s=2), metadata=md("ext"))
            assert await code_of(call) is grpc.StatusCode.DEADLINE_EXCEEDED
            s = await scrape_until(gw, lambda s: requests_(s, "ext", "DEADLINE_EXCEEDED") == 1)
            assert requests_(s, "ext", "DEADLINE_EXCEEDED") == 1
            assert s.get("ray_serve_num_grpc_error_requests_total", application="ext",
                         error_code="DEADLINE_EXCEEDED", method=PREDICT, route="ext") == 1
            rl = {"application": "ext", "deployment": "E",
                  "replica": only_slot(gw, "ext").replica_id, "route": "ext"}
            assert s.get("ray_serve_deployment_request_counter_total", **rl) == 1
            # A deadline that ran out is not the replica failing.
            assert s.get("ray_serve_deployment_error_counter_total", **rl) is None
            lat = s.get("ray_serve_grpc_request_latency_ms_sum", application="ext",
                        method=PREDICT, route="ext", status_code="DEADLINE_EXCEEDED")
            assert lat is not None and 250 < lat < 2000


async def test_client_deadline_is_recorded_as_deadline_exceeded(start_gateway: Any) -> None:
    async with external_replica() as (_, port):
        app = {"name": "ext", "deployments": [{"name": "E", "targets": [f"127.0.0.1:{port}"]}]}
        async with start_gateway([app]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            call = text_stub(ch).Predict(PredictRequest(sleep_s=2), metadata=md("ext"),
                                         timeout=0.3)
            assert await code_of(call) is grpc.StatusCode.DEADLINE_EXCEEDED
            s = await scrape_until(
                gw, lambda s: bool(s.where("ray_serve_num_grpc_requests_total",
                                           application="ext")), timeout=5)
            assert requests_(s, "ext", "DEADLINE_EXCEEDED") == 1


async def test_streamed_message_sizes_are_counted(start_gateway: Any) -> None:
    """gRFC A66 sizes cover every message of client-streaming and bidi calls too."""
    msgs = [PredictRequest(text="good " * n) for n in (1, 5, 20)]
    rcvd = sum(m.ByteSize() for m in msgs)

    async def reqs() -> Any:
        for m in msgs:
            yield m

    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        batch = await stub.PredictBatch(reqs(), metadata=md())
        chat = [r async for r in stub.Chat(reqs(), metadata=md())]
        for method, sent in (("/demo.text.TextModel/PredictBatch", batch.ByteSize()),
                             ("/demo.text.TextModel/Chat", sum(r.ByteSize() for r in chat))):
            a66 = {"grpc_method": method.lstrip("/"), "grpc_status": "OK"}
            s = await scrape_until(gw, lambda s, a=a66: s.get(
                "grpc_server_call_rcvd_total_compressed_message_size_bytes_count", **a) == 1)
            got = s.get("grpc_server_call_rcvd_total_compressed_message_size_bytes_sum", **a66)
            assert got == rcvd
            sent_sum = s.get("grpc_server_call_sent_total_compressed_message_size_bytes_sum",
                             **a66)
            assert sent_sum == sent


async def test_failed_start_stops_what_had_started(tmp_path: Any) -> None:
    """A start that fails half-way (metrics port taken) stops the parts already up; a grpc.aio
    server left behind hung grpc's shutdown in a later test."""
    from tests.conftest import gateway_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = gateway_config([TEXT_APP], tmp_path, metrics={"prometheus": {"port": port}})
        gw = Gateway(cfg, logs_dir=tmp_path / "logs")
        with pytest.raises(OSError, match="cannot serve metrics"):
            await gw.start()
    assert gw.state == "DRAINED"
    assert gw.admin_port == 0 or not _port_open(gw.admin_port)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
