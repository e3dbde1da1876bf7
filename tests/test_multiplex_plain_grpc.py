"""Replicas report their multiplexed models in the trailers of plain gRPC calls (streaming
methods, `local_transport: grpc`), so the gateway routes those by model id too; clients never
see the report."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.runtime import models_trailer
from tests.conftest import PredictRequest, text_stub
from tests.test_multiplex_routing import held, mmd, mux_app


@pytest.mark.parametrize("transport", ["grpc", "mux"])
async def test_streaming_and_grpc_transport_calls_report_models(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    monkeypatch.setenv("MUX_TEST_SLOTS", "4")
    async with start_gateway([mux_app(2)], proxy={"local_transport": transport}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for i in range(3):
            call = stub.PredictStream(PredictRequest(text="x", repeat=1),
                                      metadata=mmd(f"s{i}"), timeout=20)
            assert [m.label async for m in call] == [f"s{i}"]
            keys = [k for k, _ in await call.trailing_metadata()]
            assert models_trailer.MODELS_KEY not in keys
        unary = stub.Predict(PredictRequest(text="x"), metadata=mmd("u0"), timeout=20)
        await unary
        assert models_trailer.MODELS_KEY not in [k for k, _ in await unary.trailing_metadata()]
        reported = set().union(*held(gw).values())
        assert {"s0", "s1", "s2"} <= reported
        if transport == "grpc":
            assert "u0" in reported


def test_report_is_ascii_and_bounded() -> None:
    ids = [f"m-\u00e9-{i}-" + "x" * 200 for i in range(100)]
    value = models_trailer.encode(ids, 0)
    assert value.isascii() and len(value) <= models_trailer.MAX_BYTES
    got = models_trailer.decode(value)
    assert got is not None and got[1] == 0 and got[0] == ids[-len(got[0]):] and got[0]
    for junk in ("", "[", "[1,2]", '[["a"],-1]', '[["a"],true]', "{}"):
        assert models_trailer.decode(junk) is None
