"""The replica-side model cache of `@gateway.multiplexed`: LRU, unload hooks, one load for
concurrent first calls, failing loads, the call's model id."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

import gateway
from gateway.runtime import multiplex
from gateway.runtime.multiplex import MultiplexedModelError


class Model:
    def __init__(self, model_id: str, log: list[str]) -> None:
        self.model_id = model_id
        self.log = log


class SyncClose(Model):
    def close(self) -> None:
        self.log.append(f"close {self.model_id}")


class AsyncClose(Model):
    async def close(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"aclose {self.model_id}")


class WithDel(Model):
    def __del__(self) -> None:
        self.log.append(f"del {self.model_id}")


class Owner:
    def __init__(self, kind: type[Model] = SyncClose, delay: float = 0.0) -> None:
        self.kind = kind
        self.delay = delay
        self.loads: list[str] = []
        self.log: list[str] = []

    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        self.loads.append(model_id)
        await asyncio.sleep(self.delay)
        if model_id.startswith("fail"):
            raise ValueError(f"no weights for {model_id}")
        return self.kind(model_id, self.log)


async def test_lru_eviction_runs_sync_close() -> None:
    o = Owner(SyncClose)
    a = await o.get_model("a")
    assert await o.get_model("a") is a  # cached: the same object, no second load
    await o.get_model("b")
    await o.get_model("a")  # a is now the most recently used
    await o.get_model("c")  # evicts b, the least recently used
    assert o.loads == ["a", "b", "c"]
    assert o.log == ["close b"]
    await o.get_model("b")  # evicts a
    assert o.loads == ["a", "b", "c", "b"]
    assert o.log == ["close b", "close a"]


async def test_async_close_is_awaited() -> None:
    o = Owner(AsyncClose)
    for m in ("a", "b", "c"):
        await o.get_model(m)
    assert o.log == ["aclose a"]


async def test_without_close_dropping_the_model_runs_its_del() -> None:
    o = Owner(WithDel)
    for m in ("a", "b", "c"):
        await o.get_model(m)
    assert o.log == ["del a"]  # the cache held the only reference


async def test_twenty_concurrent_first_calls_load_once() -> None:
    o = Owner(delay=0.1)
    got = await asyncio.gather(*(o.get_model("x") for _ in range(20)))
    assert o.loads == ["x"]
    assert all(m is got[0] for m in got)


async def test_a_caller_going_away_does_not_cancel_the_load_others_wait_for() -> None:
    o = Owner(delay=0.2)
    first = asyncio.ensure_future(o.get_model("x"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(o.get_model("x"))
    first.cancel()
    m = await asyncio.wait_for(second, 5)
    assert m.model_id == "x" and o.loads == ["x"]
    assert first.cancelled()


async def test_failing_load_is_not_cached_and_has_a_clear_status() -> None:
    o = Owner()
    results = await asyncio.gather(*(o.get_model("fail-1") for _ in range(3)),
                                   return_exceptions=True)
    assert o.loads == ["fail-1"]  # the waiters shared the one failing load
    for e in results:
        assert isinstance(e, MultiplexedModelError)
        assert e.code is grpc.StatusCode.UNAVAILABLE
        assert e.details == "multiplexed model 'fail-1' failed to load: ValueError: no weights " \
                            "for fail-1"
    with pytest.raises(MultiplexedModelError):
        await o.get_model("fail-1")
    assert o.loads == ["fail-1", "fail-1"]  # tried again: failures are not cached
    assert "fail-1" not in multiplex.registry.report()[0]


@pytest.mark.parametrize("bad", ["", "x" * 300, "a\nb", None, 7])
async def test_bad_or_missing_model_id_is_invalid_argument(bad: Any) -> None:
    o = Owner()
    with pytest.raises(MultiplexedModelError) as e:
        await o.get_model(bad)
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert o.loads == []


async def test_model_id_of_the_call_is_the_default() -> None:
    o = Owner()
    token = multiplex.set_model_id("from-metadata")
    try:
        assert gateway.get_multiplexed_model_id() == "from-metadata"
        m = await o.get_model()
    finally:
        multiplex._model_id.reset(token)
    assert m.model_id == "from-metadata"
    assert gateway.get_multiplexed_model_id() == ""


async def test_plain_function_loader_and_no_limit() -> None:
    loads: list[str] = []

    @gateway.multiplexed(max_num_models_per_replica=-1)
    async def load(model_id: str) -> str:
        loads.append(model_id)
        return model_id.upper()

    for i in range(50):
        assert await load(f"m{i}") == f"M{i}"
    for i in range(50):
        await load(f"m{i}")
    assert len(loads) == 50  # nothing evicted


async def test_report_counts_loaded_and_loading_ids() -> None:
    o = Owner(delay=0.3)
    await o.get_model("r1")
    v = multiplex.registry.version
    pending = asyncio.ensure_future(o.get_model("r2"))
    await asyncio.sleep(0.05)
    ids, _ = multiplex.registry.report()
    assert {"r1", "r2"} <= set(ids)  # a model being loaded is reported too
    assert multiplex.registry.version > v
    await pending


def test_decorator_checks_its_arguments() -> None:
    for n in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_num_models_per_replica"):
            gateway.multiplexed(max_num_models_per_replica=n)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async"):
        @gateway.multiplexed
        def sync_loader(model_id: str) -> str:
            return model_id
    with pytest.raises(TypeError, match="must take"):
        @gateway.multiplexed
        async def too_many(self: Any, a: str, b: str) -> str:
            return a


def test_import_gateway_stays_cheap() -> None:
    import subprocess
    import sys

    code = ("import sys, gateway; print('gateway.runtime.multiplex' in sys.modules, "
            "'opentelemetry.sdk.metrics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_capacity_comes_from_the_servicer_class_not_the_process() -> None:
    from examples.models import Iris, TenantIris, TextModel

    assert multiplex.declared_capacity(TenantIris) == 2
    # Same module, no loader of their own: they serve no multiplexed models.
    assert multiplex.declared_capacity(TextModel) is None
    assert multiplex.declared_capacity(Iris) is None
    assert multiplex.declared_capacity(Owner) == 2
