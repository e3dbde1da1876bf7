"""The replica cache's capacity under concurrency: never more than max_num_models_per_replica
models live (loaded, loading or closing), hanging close() or loaders bounded with clear
statuses, failed loads whose callers left are not asyncio's "never retrieved" noise."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import grpc
import pytest

import gateway
from gateway.runtime import multiplex
from gateway.runtime.multiplex import MultiplexedModelError


class Live:
    """Counts models created and not yet closed."""

    def __init__(self, owner: Counting, model_id: str) -> None:
        self.owner, self.model_id = owner, model_id

    def close(self) -> None:
        self.owner.live.discard(self.model_id)


class Counting:
    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.live: set[str] = set()
        self.loading = 0
        self.peak = 0

    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Live:
        self.loading += 1
        self.peak = max(self.peak, len(self.live) + self.loading)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.loading -= 1
        self.live.add(model_id)
        self.peak = max(self.peak, len(self.live))
        return Live(self, model_id)


def cache(owner: Any) -> multiplex._ModelCache:
    c: multiplex._ModelCache = owner.__dict__["_gateway_multiplex_get_model"]
    return c


async def test_concurrent_first_calls_for_distinct_ids_never_exceed_the_limit() -> None:
    o = Counting()
    got = await asyncio.wait_for(
        asyncio.gather(*(o.get_model(f"m{i}") for i in range(10))), 20)
    assert [m.model_id for m in got] == [f"m{i}" for i in range(10)]
    assert o.peak <= 2
    assert len(cache(o).models) <= 2
    await asyncio.sleep(0.05)
    assert len(o.live) <= 2


class HangingClose:
    async def close(self) -> None:
        await asyncio.Event().wait()


class CloseHangs:
    @gateway.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> Any:
        return HangingClose() if model_id == "a" else object()


async def test_a_close_that_never_returns_blocks_loads_only_until_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multiplex, "CLOSE_TIMEOUT_S", 0.3)
    o = CloseHangs()
    await o.get_model("a")
    await asyncio.wait_for(o.get_model("b"), 5)  # a's close() gave its slot up after 0.3 s
    await asyncio.wait_for(o.get_model("c"), 5)
    assert list(cache(o).models) == ["c"]
    assert not cache(o).closing


class LoadHangs:
    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        if model_id.startswith("hang"):
            await asyncio.Event().wait()
        return model_id


async def test_a_hanging_load_nobody_waits_for_gives_its_slot_up() -> None:
    o = LoadHangs()
    for mid in ("hang1", "hang2"):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(o.get_model(mid), 0.1)
    assert await asyncio.wait_for(o.get_model("x"), 5) == "x"
    assert "x" in cache(o).models


async def test_a_load_waiting_for_a_slot_held_by_waited_loads_gets_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multiplex, "SLOT_WAIT_S", 0.3)
    o = LoadHangs()
    held = [asyncio.ensure_future(o.get_model(m)) for m in ("hang1", "hang2")]
    await asyncio.sleep(0.05)
    with pytest.raises(MultiplexedModelError) as e:
        await asyncio.wait_for(o.get_model("x"), 5)
    assert e.value.code is grpc.StatusCode.UNAVAILABLE
    assert "no slot" in e.value.details and "'x'" in e.value.details
    for t in held:
        t.cancel()
    await asyncio.gather(*held, return_exceptions=True)


class FailsSlowly:
    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        await asyncio.sleep(0.1)
        raise ValueError("no weights")


async def test_failed_load_whose_caller_left_is_not_never_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    o = FailsSlowly()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(o.get_model("a"), 0.02)
        await asyncio.sleep(0.3)
        gc.collect()
        await asyncio.sleep(0.05)
    assert "never retrieved" not in caplog.text
    assert not cache(o).loading


class HugeFailure:
    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        raise RuntimeError("line one\nline two " + "x" * 100_000)


async def test_a_huge_multiline_load_error_gives_one_bounded_status_line() -> None:
    with pytest.raises(MultiplexedModelError) as e:
        await HugeFailure().get_model("big")
    assert e.value.code is grpc.StatusCode.UNAVAILABLE
    assert "\n" not in e.value.details and len(e.value.details) < 700
    assert "line one line two" in e.value.details
