"""Routing by `multiplexed_model_id` through a real gateway and real replica processes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from typing import Any

import grpc
import pytest
import yaml

from gateway.admin.status import build_status
from gateway.app import Gateway
from tests.conftest import PredictRequest, text_stub
from tests.metrics_util import scrape_until


def mux_app(replicas: int, max_ongoing: int = 5) -> dict[str, Any]:
    return {"name": "mx", "deployments": [{
        "name": "MuxText", "import_path": "tests.multiplex_models:MuxText",
        "num_replicas": replicas, "max_ongoing_requests": max_ongoing}]}


def mmd(model_id: str | None) -> tuple[tuple[str, str], ...]:
    out = [("application", "mx")]
    if model_id is not None:
        out.append(("multiplexed_model_id", model_id))
    return tuple(out)


def held(gw: Gateway) -> dict[str, frozenset[str]]:
    """What each replica reported holding, as the gateway knows it."""
    return {s.replica_id: s.replica.mux_models
            for _, s in gw.controller.slots() if s.replica is not None}


async def call(stub: Any, model_id: str | None, **kw: Any) -> Any:
    return await stub.Predict(PredictRequest(text="x"), metadata=mmd(model_id), timeout=20, **kw)


async def test_affinity_keeps_each_model_on_the_replicas_holding_it(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "4")
    ids = [f"m{i}" for i in range(10)]
    rng = random.Random(15)
    # Skewed: the first ids get most calls (weights 1/(rank+1)), as tenants do.
    pattern = rng.choices(ids, weights=[1 / (i + 1) for i in range(10)], k=1000)
    async with start_gateway([mux_app(3)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        sem = asyncio.Semaphore(6)

        async def one(mid: str) -> None:
            async with sem:
                r = await call(stub, mid)
                assert r.label == mid

        await asyncio.gather(*(one(m) for m in pattern))

        def rows(s: Any) -> tuple[float, float]:
            loads = sum(s.series("ray_serve_multiplexed_models_load_counter_total").values())
            gets = sum(
                s.series("ray_serve_multiplexed_get_model_requests_counter_total").values())
            return loads, gets

        s = await scrape_until(gw, lambda s: rows(s)[1] == 1000)
        loads, gets = rows(s)
        assert gets == 1000
        hit_rate = 1 - loads / gets
        assert hit_rate >= 0.9, (loads, gets)
        # Now each id's calls go to a replica that holds it: no more loads, and the answering
        # replica is one the gateway knew held the id before the call.
        for mid in ids:
            for _ in range(3):
                before = held(gw)
                r = await call(stub, mid)
                assert mid in before[r.replica], (mid, r.replica, before)
        s = await scrape_until(gw, lambda s: rows(s)[1] == 1030)
        assert rows(s) == (loads, 1030)


async def test_burst_of_first_calls_loads_the_model_once(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "2")
    async with start_gateway([mux_app(2, max_ongoing=20)]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        got = await asyncio.gather(*(call(stub, "slow-x") for _ in range(20)))
        assert {r.replica for r in got} == {got[0].replica}  # all followed the first one
        assert all("slow-x=1" in r.seen_metadata["loads"] for r in got)


async def test_failing_loader_answers_unavailable_and_is_retried_later(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "2")
    async with start_gateway([mux_app(1)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(stub, "fail-7")
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == ("multiplexed model 'fail-7' failed to load: "
                                         "ValueError: no weights for fail-7")
        r = await call(stub, "ok")
        assert "fail-7=2" in r.seen_metadata["loads"]  # not cached: loaded again, failed again
        assert held(gw) == {r.replica: frozenset({"ok"})}


async def test_missing_or_bad_model_id_is_invalid_argument(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_gateway([mux_app(1)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        await call(stub, "warm")  # the gateway now knows the replica's models
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(stub, None)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "multiplexed_model_id" in (e.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(stub, "x" * 300)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == ("Metadata 'multiplexed_model_id': must be 1-256 printable "
                                     "characters")
        assert (await call(stub, "warm")).label == "warm"  # the gateway is fine


async def test_streaming_call_sees_the_model_id(start_gateway: Any) -> None:
    async with start_gateway([mux_app(1)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        out = [m.label async for m in stub.PredictStream(
            PredictRequest(text="x", repeat=3), metadata=mmd("streamed"), timeout=20)]
        assert out == ["streamed"] * 3


async def test_replica_restart_forgets_its_models(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "2")
    async with start_gateway([mux_app(2)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        first = await call(stub, "a")
        victim = first.replica
        assert "a" in held(gw)[victim]
        (slot,) = [s for _, s in gw.controller.slots() if s.replica_id == victim]
        assert slot.replica is not None and slot.replica.pid
        old = slot.replica
        os.kill(old.pid, signal.SIGKILL)  # type: ignore[arg-type]
        # A call already on its way to the dead process fails (as any call to a replica that
        # dies); then its models are forgotten and "a" goes to the other replica.
        end = time.monotonic() + 30
        failures: list[str] = []
        while slot.replica is old and time.monotonic() < end:
            try:
                r = await call(stub, "a")
            except grpc.aio.AioRpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE
                failures.append(e.details() or "")
                assert not old.mux_models  # its stream ended: nothing routed to it by model
            else:
                assert r.label == "a" and r.replica != victim
            await asyncio.sleep(0.05)
        assert len(failures) <= 1, failures
        assert not old.mux_models
        while (slot.replica is None or not slot.replica.routable) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert slot.replica is not None and slot.replica is not old
        assert slot.replica.mux_models == frozenset()  # the new process starts empty
        # "a" stays with the replica that holds it (the one that loaded it after the kill).
        r = await call(stub, "a")
        for _ in range(10):
            before = held(gw)
            assert "a" in before[r.replica], before
            assert (await call(stub, "a")).replica == r.replica
        status = build_status(gw).to_dict(verbose=True)
        reps = status["applications"]["mx"]["deployments"]["MuxText"]["replicas"]
        models = {x["replica_id"]: x["multiplexed_models"] for x in reps}
        assert models == {rid: sorted(ms) for rid, ms in held(gw).items()}
        assert sum(m.count("a") for m in models.values()) == 1


async def test_without_the_key_other_deployments_route_as_before(start_gateway: Any) -> None:
    from tests.conftest import TEXT_APP, md

    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        router = gw.proxy.routes["text"].router
        assert router.affinity is None  # the plain text model serves no multiplexed models
        r = await stub.Predict(PredictRequest(text="x"),
                               metadata=(*md("text"), ("multiplexed_model_id", "t1")))
        assert r.seen_metadata["multiplexed_model_id"] == "t1"  # forwarded as it was


async def test_loads_spread_over_replicas_with_free_slots(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "2")
    async with start_gateway([mux_app(2)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for mid in ("a", "b", "c", "d"):
            await call(stub, mid)
        # Four models, four slots: each loaded once, none evicted.
        where = held(gw)
        assert sorted(m for ms in where.values() for m in ms) == ["a", "b", "c", "d"]
        assert all(len(ms) == 2 for ms in where.values())
        for mid in ("a", "b", "c", "d", "a", "c"):
            r = await call(stub, mid)
            assert mid in where[r.replica]
        loads = Counter[str]()
        for rep in where:
            del rep
        r = await call(stub, "a")
        loads.update(x.split("=")[0] for x in r.seen_metadata["loads"].split(","))
        assert loads["a"] == 1


async def test_key_sent_twice_routes_and_serves_by_the_first(start_gateway: Any) -> None:
    async with start_gateway([mux_app(2)]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        r = await call(stub, "k1")
        for _ in range(5):
            r2 = await stub.Predict(PredictRequest(text="x"), timeout=20, metadata=(
                ("application", "mx"), ("multiplexed_model_id", "k1"),
                ("multiplexed_model_id", "k2")))
            assert (r2.label, r2.replica) == ("k1", r.replica)
        assert all("k2" not in ms for ms in held(gw).values())


async def test_status_verbose_shows_models_per_replica(start_gateway: Any) -> None:
    from tests.conftest import TEXT_APP
    from tests.test_admin import admin_address, cli

    async with start_gateway([mux_app(1), TEXT_APP]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for mid in ("m-b", "m-a"):
            await call(stub, mid)
        rc, out, _ = await cli("status", "-a", admin_address(gw), "--verbose")
        assert rc == 0
        data = yaml.safe_load(out)
        (rep,) = data["applications"]["mx"]["deployments"]["MuxText"]["replicas"]
        assert rep["multiplexed_models"] == ["m-a", "m-b"]
        (text,) = data["applications"]["text"]["deployments"]["TextModel"]["replicas"]
        assert "multiplexed_models" not in text  # it serves no multiplexed models
        rc, out, _ = await cli("status", "-a", admin_address(gw))
        assert "multiplexed_models" not in out  # only with -v
