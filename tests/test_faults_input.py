"""Bad input, replayed against a real gateway: the corpus (tests/corpus/*.yaml) on raw sockets,
label cardinality under 10,000 distinct method paths and application names, and random
payloads to every built-in method with records at 100%.

Each case: the gateway answers or closes (never hangs the case, never crashes), and the next
valid call is served. The outcomes are printed as a table (pytest -s shows it)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import yaml

from gateway.app import Gateway
from gateway.dataplane.methods import MethodTable
from gateway.pb import text_model_pb2
from tests.conftest import IRIS_APP, TEXT_APP, gateway_config, md, running_gateway
from tests.h2_raw import PREDICT, build, replay
from tests.test_records import flush, scrape

CORPUS = Path(__file__).parent / "corpus"
VALID = text_model_pb2.PredictRequest(text="still here").SerializeToString()


def load(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load((CORPUS / name).read_text())
    return cases


async def valid_call(gw: Gateway) -> None:
    async with grpc.aio.insecure_channel(gw.address) as ch:
        call = ch.unary_unary(PREDICT)
        answer = await call(VALID, metadata=md("text"), timeout=10)
        assert text_model_pb2.PredictResponse.FromString(answer).label


TEXT_MAPPING = {"features": ["text"], "prediction_label": "label", "prediction_score": "score"}


def records_app(app: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**app, "prediction_records": {"enabled": True, "sample_rate": 1.0,
                                          "exporters": ["jsonl"], **extra}}


async def replay_corpus(gw: Gateway, name: str) -> list[str]:
    problems, rows = [], []
    port = int(gw.address.rsplit(":", 1)[1])
    for case in load(name):
        data = build(case["send"])
        started = time.monotonic()
        out = await asyncio.to_thread(replay, port, data, float(case.get("wait_s", 3.0)))
        took = time.monotonic() - started
        rows.append(f"{case['name']:<42} {out.kind:<9} {out.grpc_status or '-':<4} "
                    f"{took:5.2f}s {out.message[:50]!r}")
        expect = case.get("expect")
        if expect and out.kind not in expect:
            problems.append(f"{case['name']}: {out.kind} (expected one of {expect})")
        codes = case.get("grpc_status")
        if codes and out.kind == "answered" and out.grpc_status not in [str(c) for c in codes]:
            problems.append(f"{case['name']}: grpc-status {out.grpc_status} {out.message!r} "
                            f"(expected one of {codes})")
        # The case's connection is closed: no call of it is left in flight.
        for _ in range(100):
            if gw.proxy.ongoing == 0:
                break
            await asyncio.sleep(0.05)
        else:
            problems.append(f"{case['name']}: {gw.proxy.ongoing} call(s) left in flight")
        try:
            await valid_call(gw)
        except grpc.aio.AioRpcError as e:
            problems.append(f"{case['name']}: the next valid call failed: {e.code().name} "
                            f"{e.details()}")
    print(f"\n{name}: case / outcome / grpc-status / time / message")
    print("\n".join(rows))
    return problems


async def test_raw_and_metadata_corpus_answered_or_closed_and_the_next_call_served(
        tmp_path: Path) -> None:
    config = gateway_config([records_app(TEXT_APP, field_mapping=TEXT_MAPPING)], tmp_path)
    async with running_gateway(config, tmp_path) as gw:
        await valid_call(gw)
        problems = await replay_corpus(gw, "raw.yaml")
        problems += await replay_corpus(gw, "metadata.yaml")
        await flush(gw)
        assert gw.records._thread is not None and gw.records._thread.is_alive()
        assert problems == [], "\n".join(problems)
    # Escaped in the access log: no raw control character from the metadata reached a line.
    access = "".join(p.read_text(errors="replace")
                     for p in (tmp_path / "logs").rglob("*") if p.is_file())
    assert "\x1b[" not in access and "forged" not in access.replace("\\n2026", "")


def series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.timeout(400)
async def test_ten_thousand_method_paths_and_application_names_keep_series_bounded(
        tmp_path: Path) -> None:
    n = int(os.environ.get("GATEWAY_CARDINALITY_N", "10000"))
    config = gateway_config([TEXT_APP], tmp_path)
    proc = psutil.Process()
    async with running_gateway(config, tmp_path) as gw:
        assert gw.metrics_port
        await valid_call(gw)
        before = series(await asyncio.to_thread(scrape, gw.metrics_port))
        rss_before = proc.memory_info().rss
        codes: dict[str, int] = {}
        gate = asyncio.Semaphore(64)
        async with grpc.aio.insecure_channel(gw.address) as ch:

            async def one(path: str, app: str) -> None:
                async with gate:
                    try:
                        await ch.unary_unary(path)(VALID, metadata=md(app), timeout=10)
                        code = "OK"
                    except grpc.aio.AioRpcError as e:
                        code = e.code().name
                    codes[code] = codes.get(code, 0) + 1

            rng = random.Random(5)
            for batch in range(0, n, 500):
                await asyncio.gather(*(
                    one(f"/fuzz.S{rng.randrange(1 << 30)}/M{i}", "text")
                    for i in range(batch, min(n, batch + 500))))
                await asyncio.gather(*(
                    one(PREDICT, f"app-{i}-{rng.randrange(1 << 30)}")
                    for i in range(batch, min(n, batch + 500))))
        await valid_call(gw)
        text = await asyncio.to_thread(scrape, gw.metrics_port)
        after = series(text)
        rss_after = proc.memory_info().rss
    print(f"\ncardinality: {n} method paths + {n} application names; calls by status "
          f"{codes}; series {before} -> {after}; test process RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert sum(codes.values()) == 2 * n
    assert "OK" not in codes
    assert not re.search(r'method="/fuzz\.', text) and 'application="app-' not in text
    # Bounded: the `other` method and `unknown` application add a fixed set of series.
    assert after - before < 400, (before, after)


def _random_servicer(seed: int) -> grpc.GenericRpcHandler:
    """A replica that answers every method with random bytes (valid messages for 'valid')."""
    table = MethodTable()
    rng = random.Random(seed)
    reply = text_model_pb2.PredictResponse(label="ok", score=0.5).SerializeToString()

    def answer(request: bytes) -> bytes:
        return reply if request == VALID else rng.randbytes(rng.randrange(0, 200))

    async def uu(req: bytes, ctx: Any) -> bytes:
        return answer(req)

    async def us(req: bytes, ctx: Any) -> Any:
        for _ in range(3):
            yield answer(req)

    async def su(reqs: Any, ctx: Any) -> bytes:
        last = b""
        async for r in reqs:
            last = r
        return answer(last)

    async def ss(reqs: Any, ctx: Any) -> Any:
        async for r in reqs:
            yield answer(r)

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            info = table.get(details.method)
            if info is None:
                return None
            shape = (info.client_streaming, info.server_streaming)
            return {(False, False): grpc.unary_unary_rpc_method_handler(uu),
                    (False, True): grpc.unary_stream_rpc_method_handler(us),
                    (True, False): grpc.stream_unary_rpc_method_handler(su),
                    (True, True): grpc.stream_stream_rpc_method_handler(ss)}[shape]

    return Handler()


async def test_random_payloads_to_every_builtin_method_records_count_decode_failures(
        tmp_path: Path) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_random_servicer(11),))
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    ext = [{"name": "Ext", "targets": [f"127.0.0.1:{port}"]}]
    apps = [records_app({**TEXT_APP, "deployments": ext}, field_mapping=TEXT_MAPPING),
            records_app({**IRIS_APP, "deployments": ext})]
    rng = random.Random(3)
    codes: dict[str, int] = {}
    try:
        async with running_gateway(gateway_config(apps, tmp_path), tmp_path) as gw:
            methods = [gw.methods.get(f"/{s}/{m}") for s in gw.methods.services()
                       for m in _method_names(gw, s)]
            async with grpc.aio.insecure_channel(gw.address) as ch:
                for info in methods:
                    assert info is not None
                    app = "classifier" if "inference" in info.path else "text"
                    for _ in range(15):
                        payload = rng.randbytes(rng.randrange(0, 300))
                        code = await _call(ch, info, payload, app)
                        codes[code] = codes.get(code, 0) + 1
            await flush(gw)
            dropped = dict(gw.records.calls_dropped)
            built = gw.records.records_built
            assert gw.records._thread is not None and gw.records._thread.is_alive()
            assert dropped.get("decode_error", 0) > 0, gw.records.snapshot()
            # The pipeline keeps going: a valid call still makes a record.
            await valid_call(gw)
            await flush(gw)
            assert gw.records.records_built > built
    finally:
        await server.stop(0)
    print(f"\nrandom payloads to {len(methods)} methods: calls by status {codes}; "
          f"records built {gw.records.records_built}; calls dropped {dropped}")


def _method_names(gw: Gateway, service: str) -> list[str]:
    from google.protobuf import descriptor_pool

    return [m.name for m in descriptor_pool.Default().FindServiceByName(service).methods]


async def _call(ch: grpc.aio.Channel, info: Any, payload: bytes, app: str) -> str:
    try:
        if not info.client_streaming and not info.server_streaming:
            await ch.unary_unary(info.path)(payload, metadata=md(app), timeout=5)
        elif not info.client_streaming:
            async for _ in ch.unary_stream(info.path)(payload, metadata=md(app), timeout=5):
                pass
        elif not info.server_streaming:
            await ch.stream_unary(info.path)(iter([payload, payload]), metadata=md(app),
                                             timeout=5)
        else:
            async for _ in ch.stream_stream(info.path)(iter([payload, payload]),
                                                       metadata=md(app), timeout=5):
                pass
        return "OK"
    except grpc.aio.AioRpcError as e:
        return e.code().name


@pytest.mark.parametrize("unused", [None])
def test_corpus_files_parse(unused: None) -> None:
    for name in ("raw.yaml", "metadata.yaml"):
        for case in load(name):
            assert build(case["send"]), case["name"]


async def test_non_utf8_metadata_in_a_loop_does_not_flood_the_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.logs import grpc_noise

    config = gateway_config([TEXT_APP], tmp_path)
    spec = [preface_steps := "preface", "settings",
            {"request": {"extra": [["x-blob", {"hex": "00ff0d0a1b5b33316d"}]]}}, {"data": {}}]
    assert preface_steps
    async with running_gateway(config, tmp_path) as gw:
        port = int(gw.address.rsplit(":", 1)[1])
        flt = grpc_noise.install()
        before = flt.suppressed
        caplog.clear()
        for _ in range(30):
            out = await asyncio.to_thread(replay, port, build(spec), 3.0)
            assert out.kind == "answered" and out.grpc_status == "0"
        await valid_call(gw)
    noisy = [r for r in caplog.records if "Invalid encoding" in r.getMessage()
             or (r.name == "grpc._cython.cygrpc" and r.levelno >= logging.ERROR
                 and "encoding" in r.getMessage())]
    assert noisy == []
    assert flt.suppressed - before >= 30
    condensed = [r for r in caplog.records if "condensed" in r.getMessage()]
    assert len(condensed) <= 1
    for r in condensed:
        assert r.exc_info is None and "\\xff" not in r.getMessage()
