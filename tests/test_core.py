"""The data plane end to end: real gateway, real replica processes, real clients."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.dataplane.replicas import Replica, ReplicaState
from gateway.dataplane.router import Router
from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.pb import grpc_predict_v2_pb2_grpc as oip_grpc
from gateway.pb import ray_serve_pb2, ray_serve_pb2_grpc
from tests.conftest import IRIS_APP, TEXT_APP, PredictRequest, external_replica, md, text_stub

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(params=["mux", "grpc"])
def start_gateway(request: pytest.FixtureRequest, start_gateway: Any) -> Any:
    """Every test here runs over both ways of reaching local replicas."""

    def start(apps: list[dict[str, Any]], **top: Any) -> Any:
        proxy = {**top.pop("proxy", {}), "local_transport": request.param}
        return start_gateway(apps, proxy=proxy, **top)

    return start


def app(name: str, import_path: str = "examples.models:TextModel", **dep: Any) -> dict[str, Any]:
    return {"name": name, "deployments": [{"name": "D", "import_path": import_path, **dep}]}


async def test_all_four_shapes(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        r = await stub.Predict(PredictRequest(text="good good"), metadata=md())
        assert (r.label, r.replica.startswith("text#TextModel#")) == ("positive", True)

        got = [m.index async for m in stub.PredictStream(PredictRequest(text="x", repeat=4),
                                                         metadata=md())]
        assert got == [0, 1, 2, 3]

        async def reqs() -> Any:
            for t in ("bad", "awful", "good"):
                yield PredictRequest(text=t)

        r = await stub.PredictBatch(reqs(), metadata=md())
        assert (r.index, r.label) == (3, "negative")

        chat = [(m.index, m.label) async for m in stub.Chat(reqs(), metadata=md())]
        assert chat == [(0, "negative"), (1, "negative"), (2, "positive")]


async def test_routing_rules(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        # One application: calls without the key go to it.
        r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(None))
        assert r.label == "positive"

    async with start_gateway([TEXT_APP, IRIS_APP, app("other")]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="good"), metadata=md(None))
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        for name in ("text", "classifier", "other"):
            assert repr(name) in (e.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="good"), metadata=md("nope"))
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        assert "'nope' not found" in (e.value.details() or "")
        assert "'classifier'" in (e.value.details() or "")

        r = await stub.Predict(PredictRequest(text="good"), metadata=md("other"))
        assert r.replica.startswith("other#D#")
        r = await stub.Predict(PredictRequest(text="good"), metadata=md("text"))
        assert r.replica.startswith("text#TextModel#")


async def test_replica_status_details_and_trailers_pass_through(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        call = text_stub(ch).Predict(PredictRequest(text="x", fail_code=3), metadata=md())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "failing as asked: INVALID_ARGUMENT"
        trailers = dict(e.value.trailing_metadata() or ())
        assert trailers["x-fail-reason"] == "requested"
        assert UUID.match(trailers["x-request-id"])

        # A status from inside a stream after messages were sent also passes through.
        stream = text_stub(ch).PredictStream(
            PredictRequest(text="x", repeat=3, fail_code=9), metadata=md()
        )
        seen = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for m in stream:
                seen.append(m.index)
        assert seen == [0]
        assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_request_id_echoed_forwarded_and_generated(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        call = stub.Predict(PredictRequest(text="good"), metadata=md(x_request_id="req-123"))
        r = await call
        assert r.seen_metadata["x-request-id"] == "req-123"
        trailers = dict(await call.trailing_metadata())
        assert trailers["x-request-id"] == trailers["request_id"] == "req-123"

        call = stub.Predict(PredictRequest(text="good"), metadata=md(request_id="ray-style-9"))
        r = await call
        assert r.seen_metadata["x-request-id"] == "ray-style-9"
        assert dict(await call.trailing_metadata())["x-request-id"] == "ray-style-9"

        call = stub.Predict(PredictRequest(text="good"), metadata=md())
        r = await call
        generated = dict(await call.trailing_metadata())["x-request-id"]
        assert UUID.match(generated)
        assert r.seen_metadata["x-request-id"] == generated

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="good"), metadata=md(x_request_id="x" * 600))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "x-request-id" in (e.value.details() or "")


async def test_metadata_forwarded_without_hop_headers(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        r = await text_stub(ch).Predict(
            PredictRequest(text="good"), metadata=md(x_tenant="acme", multiplexed_model_id="m1")
        )
        assert r.seen_metadata["x-tenant"] == "acme"
        assert r.seen_metadata["multiplexed-model-id"] == "m1"
        assert "grpc-timeout" not in r.seen_metadata


async def test_deadline_reaches_replica(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(), timeout=3.0)
        # What remains of the client's deadline (grpc rounds the header up by a few ms).
        assert 2.0 < r.deadline_remaining_s < 3.05
        r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md())
        assert r.deadline_remaining_s == -1.0  # no deadline set, none invented

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await text_stub(ch).Predict(PredictRequest(sleep_s=3), metadata=md(), timeout=0.3)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_request_timeout_applies_without_client_deadline(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP], proxy={"request_timeout_s": 0.3}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await text_stub(ch).Predict(PredictRequest(sleep_s=3), metadata=md())
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.5


async def test_cancel_reaches_replica(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        call = stub.Predict(PredictRequest(sleep_s=5), metadata=md())
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(50):
            r = await stub.Predict(PredictRequest(text="x"), metadata=md())
            if r.seen_metadata["cancelled_seen"] == "1":
                break
            await asyncio.sleep(0.05)
        assert r.seen_metadata["cancelled_seen"] == "1"
        assert gw.proxy.ongoing == 0


def test_router_prefers_less_loaded_replica() -> None:
    async def run() -> None:
        r = Router("a", "d", max_ongoing=5, max_queued=0)
        busy = Replica("a", "d", "a#d#1", "127.0.0.1:1", 1 << 20, False)
        idle = Replica("a", "d", "a#d#2", "127.0.0.1:2", 1 << 20, False)
        for rep in (busy, idle):
            rep.state = ReplicaState.RUNNING
        busy.in_flight = 3
        r.set_replicas([busy, idle])
        for _ in range(20):
            got = await r.acquire(None)
            assert got is idle
            r.release(got)
        # Unhealthy replicas get no traffic even when idle.
        idle.state = ReplicaState.UNHEALTHY
        got = await r.acquire(None)
        assert got is busy
        for rep in (busy, idle):
            await rep.close()

    asyncio.run(run())


async def test_load_spread_over_two_replicas(start_gateway: Any) -> None:
    apps = [app("text", num_replicas=2, max_ongoing_requests=8)]
    async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        results = await asyncio.gather(
            *(stub.Predict(PredictRequest(sleep_s=0.3), metadata=md()) for _ in range(16))
        )
        per_replica: dict[str, int] = {}
        for r in results:
            per_replica[r.replica] = per_replica.get(r.replica, 0) + 1
        # 16 concurrent calls, 8 at most per replica: both replicas must take exactly 8.
        assert sorted(per_replica.values()) == [8, 8]


async def test_queue_bound_gives_resource_exhausted(start_gateway: Any) -> None:
    apps = [app("text", max_ongoing_requests=1, max_queued_requests=1)]
    async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        calls = [stub.Predict(PredictRequest(sleep_s=0.5), metadata=md()) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errs = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(errs) == 1
        assert errs[0].code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests" in (errs[0].details() or "")
        assert sum(1 for r in results if not isinstance(r, BaseException)) == 2
        assert gw.controller.apps["text"].ingress.router.queued == 0


async def test_killed_local_replica_is_restarted(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        (slot,) = gw.controller.apps["text"].ingress.slots
        old_pid = slot.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if slot.pid != old_pid and slot.state is ReplicaState.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert slot.pid != old_pid and slot.state is ReplicaState.RUNNING
        assert slot.starts == 2
        r = await stub.Predict(PredictRequest(text="good"), metadata=md(), timeout=5)
        assert r.label == "positive"


async def test_external_replica_down_then_back(start_gateway: Any) -> None:
    async with external_replica() as (server, port):
        apps = [{"name": "ext", "deployments": [
            {"name": "Remote", "targets": [f"127.0.0.1:{port}"], "health_check_period_s": 0.2}
        ]}]
        async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            stub = text_stub(ch)
            r = await stub.Predict(PredictRequest(text="good"), metadata=md("ext"))
            assert r.label == "positive"
            await server.stop(0)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Predict(PredictRequest(text="good"), metadata=md("ext"), timeout=10)
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 3, "a down replica must fail fast, not hang"

            async with external_replica(port=port):
                deadline = time.monotonic() + 15
                ok = False
                while time.monotonic() < deadline and not ok:
                    try:
                        r = await stub.Predict(PredictRequest(text="good"), metadata=md("ext"),
                                               timeout=2)
                        ok = r.label == "positive"
                    except grpc.aio.AioRpcError as err:
                        assert err.code() is grpc.StatusCode.UNAVAILABLE
                        await asyncio.sleep(0.2)
                assert ok


async def test_unreachable_replica_is_retried_on_another(start_gateway: Any) -> None:
    async with external_replica() as (_, good_port), external_replica() as (bad, bad_port):
        apps = [{"name": "ext", "deployments": [{
            "name": "Remote", "targets": [f"127.0.0.1:{good_port}", f"127.0.0.1:{bad_port}"],
            "health_check_period_s": 30,
        }]}]
        async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            await bad.stop(0)  # down, but the health check has not noticed yet
            stub = text_stub(ch)
            for _ in range(10):
                r = await stub.Predict(PredictRequest(text="good"), metadata=md("ext"), timeout=5)
                assert r.label == "positive"


async def test_oversized_message_is_resource_exhausted(start_gateway: Any) -> None:
    limit = 64 * 1024
    async with start_gateway([TEXT_APP], proxy={"max_message_bytes": limit}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await text_stub(ch).Predict(PredictRequest(text="a" * (limit + 10)), metadata=md())
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (e.value.details() or "")
        # The gateway is still fine afterwards.
        r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md())
        assert r.label == "positive"


async def test_unknown_method_is_forwarded_and_replica_answers(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        unknown = ch.unary_unary("/demo.text.TextModel/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unknown(b"", metadata=md())
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_open_inference_protocol_typed_and_raw(start_gateway: Any) -> None:
    async with start_gateway([IRIS_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        rows = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
        tensor = oip.ModelInferRequest.InferInputTensor
        typed = oip.ModelInferRequest(model_name="iris", id="r1", inputs=[
            tensor(name="features", datatype="FP32", shape=[2, 4],
                   contents=oip.InferTensorContents(fp32_contents=rows))])
        raw = oip.ModelInferRequest(
            model_name="iris",
            inputs=[tensor(name="features", datatype="FP32", shape=[2, 4])],
            raw_input_contents=[struct.pack("<8f", *rows)],
        )
        a = await stub.ModelInfer(typed, metadata=md("classifier"))
        b = await stub.ModelInfer(raw, metadata=md("classifier"))
        labels = list(a.outputs[0].contents.bytes_contents)
        assert labels == [b"setosa", b"virginica"]
        # Raw inputs get raw outputs (what Triton's clients read): 4-byte length, then bytes.
        assert not b.outputs[0].HasField("contents")
        assert b.raw_output_contents[0] == b"".join(
            struct.pack("<I", len(v)) + v for v in labels)
        assert a.id == "r1"
        live = await stub.ServerLive(oip.ServerLiveRequest(), metadata=md("classifier"))
        assert live.live
        meta = await stub.ModelMetadata(oip.ModelMetadataRequest(name="iris"),
                                        metadata=md("classifier"))
        assert [i.name for i in meta.inputs] == ["features"]


async def test_ray_api_health_and_reflection(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP, IRIS_APP]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        ray = ray_serve_pb2_grpc.RayServeAPIServiceStub(ch)
        apps = await ray.ListApplications(ray_serve_pb2.ListApplicationsRequest())
        assert sorted(apps.application_names) == ["classifier", "text"]
        hz = await ray.Healthz(ray_serve_pb2.HealthzRequest())
        assert hz.message == "success"

        h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for resp in refl.ServerReflectionInfo(ask()):
            names = {s.name for s in resp.list_services_response.service}
        assert {"inference.GRPCInferenceService", "ray.serve.RayServeAPIService",
                "grpc.health.v1.Health"} <= names


async def test_broken_constructor_marks_deployment_unhealthy(start_gateway: Any) -> None:
    apps = [app("broken", "examples.models:Broken"), TEXT_APP]
    async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        dep = gw.controller.apps["broken"].ingress
        assert dep.status == "UNHEALTHY"
        assert "model weights not found" in dep.message
        assert gw.controller.apps["broken"].status == "DEPLOY_FAILED"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await text_stub(ch).Predict(PredictRequest(text="x"), metadata=md("broken"))
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # The other application is unaffected.
        r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md("text"))
        assert r.label == "positive"


async def test_cancelled_calls_do_not_disturb_calls_beside_them(start_gateway: Any) -> None:
    """Clients cancelling calls (a load generator stopping) must not fail the others, which
    share the replica's stream when local_transport is mux."""
    apps = [app("text", max_ongoing_requests=64)]
    async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for round_ in range(30):
            calls = [stub.Predict(PredictRequest(text="good"), metadata=md()) for _ in range(40)]
            # Cancel while the gateway is forwarding: at varied points of the calls' lives.
            await asyncio.sleep(0.0005 * (round_ % 10))
            for c in calls[::3]:
                c.cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            for i, r in enumerate(results):
                if i % 3 == 0:
                    assert isinstance(r, asyncio.CancelledError) or r.label == "positive"
                else:
                    assert not isinstance(r, BaseException), r
                    assert r.label == "positive"
        assert gw.proxy.ongoing == 0
