"""The proxy's decisions: what it retries, deadlines across the queue, the status every path
records, request ids and the labels of refusals. Real gateway, replicas and clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.dataplane import errors
from gateway.dataplane.proxy import CallRecord
from gateway.dataplane.replicas import Replica, ReplicaState
from gateway.dataplane.router import Router
from tests.conftest import TEXT_APP, PredictRequest, md, text_stub
from tests.metrics_util import scrape_until

REPO = Path(__file__).resolve().parents[1]
PREDICT = "/demo.text.TextModel/Predict"
UUID_LEN = 36


def text_app(**dep: Any) -> dict[str, Any]:
    d = {**TEXT_APP["deployments"][0], **dep}  # type: ignore[index]
    return {"name": "text", "deployments": [d]}


def recorder(gw: Any) -> list[CallRecord]:
    records: list[CallRecord] = []
    gw.proxy.observers.append(records.append)
    return records


async def access_lines(gw: Any, rid: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The gateway's JSON access lines for request id `rid` (written off the call path)."""
    path = gw.logs_dir / "gateway.log"
    end = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [json.loads(x) for x in lines if rid in x and '"gateway.access"' in x]
        if found or time.monotonic() > end:
            return found
        await asyncio.sleep(0.05)


# -- item 2: retry only what never reached a replica -----------------------------------------


@contextlib.asynccontextmanager
async def external_processes(log: Path, *names: str) -> AsyncIterator[list[tuple[Any, int]]]:
    """External replicas, each its own process (`tests.dataplane_models`), killed by pid."""
    procs = []
    try:
        for n in names:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.dataplane_models", n, str(log), cwd=REPO,
                stdout=asyncio.subprocess.PIPE))
        out = []
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 20)
            out.append((p, int(line)))
        yield out
    finally:
        for p in procs:
            if p.returncode is None:
                os.kill(p.pid, signal.SIGKILL)
            await asyncio.wait_for(p.wait(), 10)


async def test_call_that_reached_a_dying_replica_is_not_run_again(
    start_gateway: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls.txt"
    async with external_processes(log, "A", "B") as procs:
        apps = [{"name": "ext", "deployments": [{
            "name": "Remote", "targets": [f"127.0.0.1:{port}" for _, port in procs],
            "max_ongoing_requests": 1, "health_check_period_s": 30,
        }]}]
        async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            call = text_stub(ch).Predict(PredictRequest(text="charge-card", sleep_s=1.5),
                                         metadata=md("ext"), timeout=10)
            end = time.monotonic() + 5
            while time.monotonic() < end and not (log.exists() and log.read_text()):
                await asyncio.sleep(0.02)
            first = log.read_text().split()[0]
            victim = procs[0][0] if first == "A" else procs[1][0]
            os.kill(victim.pid, signal.SIGKILL)  # dies while executing the call
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.3)
            starts = [x for x in log.read_text().splitlines() if "start charge-card" in x]
            assert starts == [f"{first} start charge-card"], "the call ran on a second replica"


# -- items 3 and 4: queue timeouts and deadlines ------------------------------------------------


async def test_queue_timeout_is_deadline_exceeded_everywhere(start_gateway: Any) -> None:
    async with start_gateway([text_app(max_ongoing_requests=1)],
                             proxy={"request_timeout_s": 0.5},
                             logging_config={"encoding": "JSON"}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        records = recorder(gw)
        stub = text_stub(ch)
        holder = stub.Predict(PredictRequest(text="a", sleep_s=2.0), metadata=md(), timeout=5)
        await asyncio.sleep(0.2)
        # No client deadline: request_timeout_s ends it while it waits for the busy replica.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="b"), metadata=md(x_request_id="queued-1"))
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "waiting for a replica" in (e.value.details() or "")
        assert dict(e.value.trailing_metadata() or ())["x-request-id"] == "queued-1"
        # A client deadline that ends in the queue.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="c"), metadata=md(x_request_id="queued-2"),
                               timeout=0.3)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await holder
        by_rid = {r.request_id: r for r in records}
        for rid in ("queued-1", "queued-2"):
            assert by_rid[rid].code is grpc.StatusCode.DEADLINE_EXCEEDED, by_rid[rid]
            (line,) = await access_lines(gw, rid)
            assert line["status"] == "DEADLINE_EXCEEDED"
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_num_grpc_requests_total", application="text", method=PREDICT,
            route="text", status_code="DEADLINE_EXCEEDED") == 2)
        assert s.get("ray_serve_num_grpc_requests_total", application="text", method=PREDICT,
                     route="text", status_code="DEADLINE_EXCEEDED") == 2
        assert s.get("ray_serve_num_grpc_requests_total", application="text", method=PREDICT,
                     route="text", status_code="OK") == 1


async def test_upstream_deadline_is_what_remains_after_the_queue(start_gateway: Any) -> None:
    async with start_gateway([text_app(max_ongoing_requests=1)]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        holder = stub.Predict(PredictRequest(text="a", sleep_s=1.0), metadata=md(), timeout=5)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        r = await stub.Predict(PredictRequest(text="b"), metadata=md(), timeout=3.0)
        waited = time.monotonic() - t0
        await holder
        assert waited > 0.5
        assert 0 < r.deadline_remaining_s <= 3.0 - waited + 0.1, (r.deadline_remaining_s, waited)

    async with start_gateway([text_app(max_ongoing_requests=1)],
                             proxy={"request_timeout_s": 1.0}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        holder = stub.Predict(PredictRequest(text="a", sleep_s=0.9), metadata=md(), timeout=5)
        await asyncio.sleep(0.05)
        # Queued ~0.85 s of its 1 s, then 0.9 s of work: request_timeout_s must end it.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="b", sleep_s=0.9), metadata=md())
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await holder


# -- item 8: a retry and the excluded replica ----------------------------------------------------


async def test_retry_never_queues_behind_an_excluded_replica_with_room() -> None:
    a = Replica("t", "D", "t#D#a", "127.0.0.1:9", 1 << 20, is_local=False)
    b = Replica("t", "D", "t#D#b", "127.0.0.1:9", 1 << 20, is_local=False)
    try:
        for r in (a, b):
            r.state = ReplicaState.RUNNING
        router = Router("t", "D", max_ongoing=1, max_queued=10)
        router.set_replicas([a])
        got = await asyncio.wait_for(router.acquire(None, exclude=a), 2)
        assert got is a and router.queued == 0
        router.release(a)
        router.set_replicas([a, b])
        b.in_flight = 1  # the only other replica is full
        got = await asyncio.wait_for(router.acquire(None, exclude=a), 2)
        assert got is a and router.queued == 0
        router.release(a)
        b.in_flight = 0  # another replica with room is preferred
        got = await asyncio.wait_for(router.acquire(None, exclude=a), 2)
        assert got is b
        router.release(b)
    finally:
        await a.close()
        await b.close()


async def test_router_queue_timeout_is_a_gateway_deadline_error() -> None:
    a = Replica("t", "D", "t#D#a", "127.0.0.1:9", 1 << 20, is_local=False)
    try:
        a.state = ReplicaState.RUNNING
        a.in_flight = 1
        router = Router("t", "D", max_ongoing=1, max_queued=10)
        router.set_replicas([a])
        with pytest.raises(errors.GatewayError) as e:
            await router.acquire(0.05)
        assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert router.queued == 0
    finally:
        await a.close()


# -- items 10 and 11, and request id rules ----------------------------------------------------


async def test_bad_request_id_refusal_keeps_labels_and_trailers(start_gateway: Any) -> None:
    other = {"name": "other", "deployments": [
        {"name": "D", "import_path": "examples.models:TextModel", "num_replicas": 1}]}
    async with start_gateway([TEXT_APP, other], logging_config={"encoding": "JSON"}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        records = recorder(gw)
        stub = text_stub(ch)
        for key, bad in (("x_request_id", "x" * 513), ("request_id", "has space")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Predict(PredictRequest(text="good"), metadata=md("text", **{key: bad}))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            shown = key.replace("_", "-") if key == "x_request_id" else key
            assert f"Metadata {shown!r}" in (e.value.details() or "")
            assert "printable ASCII" in (e.value.details() or "")
            trailers = dict(e.value.trailing_metadata() or ())
            rid = trailers["x-request-id"]
            assert trailers["request_id"] == rid and len(rid) == UUID_LEN
            # The status goes out first (abort awaits its sending); the call is recorded right
            # after, when the handler resumes: on a loaded machine the client may look first.
            for _ in range(200):
                if records and records[-1].request_id == rid:
                    break
                await asyncio.sleep(0.01)
            rec = records[-1]
            assert (rec.application, rec.deployment, rec.request_id) == ("text", "TextModel", rid)
            assert rec.code is grpc.StatusCode.INVALID_ARGUMENT and rec.gateway_error
            (line,) = await access_lines(gw, rid)
            assert (line["application"], line["status"]) == ("text", "INVALID_ARGUMENT")
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_num_grpc_requests_total", application="text", method=PREDICT,
            route="text", status_code="INVALID_ARGUMENT") == 2)
        assert s.get("ray_serve_num_grpc_requests_total", application="text", method=PREDICT,
                     route="text", status_code="INVALID_ARGUMENT") == 2
        # The longest valid id passes.
        call = stub.Predict(PredictRequest(text="good"), metadata=md(x_request_id="y" * 512))
        assert (await call).seen_metadata["x-request-id"] == "y" * 512


async def test_x_request_id_wins_over_request_id(start_gateway: Any) -> None:
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for order in (
            (("request_id", "ray-1"), ("x-request-id", "x-1")),
            (("x-request-id", "x-1"), ("request_id", "ray-1")),
        ):
            call = stub.Predict(PredictRequest(text="good"), metadata=md() + order)
            r = await call
            assert r.seen_metadata["x-request-id"] == "x-1"
            assert "request_id" not in r.seen_metadata
            assert dict(await call.trailing_metadata())["x-request-id"] == "x-1"


def test_request_id_rules() -> None:
    from gateway.dataplane.proxy import valid_request_id

    # grpc clients cannot even send most of these; other clients (raw HTTP/2) can.
    for good in ("a", "req-123", "y" * 512, "~!#$%&'*+./:;<=>?@[]^_`{|}"):
        assert valid_request_id(good), good
    for bad in ("y" * 513, "a b", "a\tb", "line\nbreak", "\x1b[31mred", "caf\u00e9", "a\x7fb",
                "a\x00b"):
        assert not valid_request_id(bad), bad
        details = errors.bad_request_id("x-request-id", bad, 512).details
        assert bad not in details and "\x1b" not in details and "\n" not in details


# -- a replica stopped under a call ------------------------------------------------------------


async def _outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """Drain a unary or server-streaming call; its final status and details."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("transport", ["mux", "grpc"])
async def test_calls_cut_by_a_replica_stop_are_answered_unavailable(
    start_gateway: Any, tmp_path: Path, transport: str
) -> None:
    """A rolling change drains the old replica for its grace, then closes its channel: calls
    still running there must end with UNAVAILABLE at once, not leave the client waiting (no
    client deadline here) nor be recorded as the client's cancel."""
    from tests.conftest import gateway_config

    dep = {"graceful_shutdown_timeout_s": 0.5}
    async with start_gateway([text_app(**dep)], proxy={"local_transport": transport}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        records = recorder(gw)
        stub = text_stub(ch)
        slow = PredictRequest(text="a", sleep_s=60, repeat=2)
        calls = [
            asyncio.ensure_future(_outcome(stub.Predict(slow, metadata=md()))),
            asyncio.ensure_future(_outcome(stub.PredictStream(slow, metadata=md()))),
        ]
        for _ in range(200):
            if gw.proxy.ongoing == 2:
                break
            await asyncio.sleep(0.05)
        assert gw.proxy.ongoing == 2
        new = text_app(**dep, import_path="tests.dataplane_models:Hooks")
        roll = asyncio.ensure_future(
            gw.apply(gateway_config([new], tmp_path, proxy={"local_transport": transport})))
        outcomes = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert await asyncio.wait_for(roll, 30) == []
        for code, details in outcomes:
            assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
        cut = [r for r in records if r.method != PREDICT or r.code is not grpc.StatusCode.OK]
        assert {r.code for r in cut} == {grpc.StatusCode.UNAVAILABLE}, cut
        # The new replica serves.
        reply = await stub.Predict(PredictRequest(text="good"), metadata=md(), timeout=10)
        assert reply.label == "ok"  # the Hooks model answers so


async def test_calls_cut_by_the_end_of_a_drain_are_recorded_as_the_client_saw_them(
    start_gateway: Any,
) -> None:
    """A call still running when the drain's grace ends is cut by the server's stop: the
    client sees UNAVAILABLE, and the gateway records UNAVAILABLE too, not a client cancel."""
    async with start_gateway([TEXT_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        records = recorder(gw)
        call = asyncio.ensure_future(_outcome(text_stub(ch).Predict(
            PredictRequest(text="a", sleep_s=30), metadata=md())))
        for _ in range(200):
            if gw.proxy.ongoing == 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.wait_for(gw.stop(grace=0.3), 20)
        code, _ = await asyncio.wait_for(call, 10)
        assert code is grpc.StatusCode.UNAVAILABLE
        assert [r.code for r in records if r.method == PREDICT] == [grpc.StatusCode.UNAVAILABLE]
