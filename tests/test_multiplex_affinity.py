"""The router's choice by model id, on real `Replica` handles (their channels never dial)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.dataplane import model_affinity
from gateway.dataplane.errors import GatewayError
from gateway.dataplane.replicas import Replica, ReplicaState
from gateway.dataplane.router import Router


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    r = Router("mx", "MuxText", max_ongoing=2, max_queued=10)
    reps = []
    for i in range(3):
        rep = Replica("mx", "MuxText", f"r{i}", f"127.0.0.1:{1 + i}", 1 << 20, is_local=True)
        rep.state = ReplicaState.RUNNING
        rep.mux_capacity = 2
        reps.append(rep)
    r.set_replicas(reps)
    yield r
    for rep in reps:
        await rep.close()


async def test_holders_first_then_a_free_slot_then_the_queue(router: Router) -> None:
    r0, r1, r2 = router.replicas
    assert router.affinity is not None
    r0.mux_models = frozenset({"a", "b"})
    r1.mux_models = frozenset({"c"})
    r2.mux_models = frozenset({"d", "e"})
    assert router.take("a") is r0
    assert router.take("a") is r0
    # r0 is at max_ongoing: "a" goes to the one replica with a free model slot.
    assert router.take("a") is r1
    # A new id: no free slot anywhere now (r1 holds "c" and "a" was placed there), so the
    # least-loaded replica with call room takes it and evicts its LRU model.
    assert router.take("z") is r2
    # "a" has two holders now (r0 reported, r1 placed): the one with room gets it.
    r1.in_flight = 0
    assert router.take("a") is r1


async def test_placement_is_remembered_until_reported(router: Router) -> None:
    first = router.take("new")
    assert first is not None
    router.release(first)
    for _ in range(5):  # before any report: the calls follow the first one
        rep = router.take("new")
        assert rep is first
        router.release(rep)
    first.mux_models = frozenset({"new"})  # the report confirms it
    assert router.take("new") is first
    assert "new" not in router.affinity._placed  # type: ignore[union-attr]


async def test_a_flood_of_ids_keeps_placements_bounded(router: Router) -> None:
    for i in range(5000):
        rep = router.take(f"id-{i}")
        if rep is not None:
            router.release(rep)
    assert len(router.affinity._placed) <= model_affinity.MAX_PLACED  # type: ignore[union-attr]


async def test_bad_id_is_refused(router: Router) -> None:
    with pytest.raises(GatewayError) as e:
        router.take("x" * 300)
    assert e.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(GatewayError):
        router.take("a\x00b")


async def test_without_multiplexed_replicas_the_id_is_ignored(router: Router) -> None:
    for rep in router.replicas:
        rep.mux_capacity = None
    router.set_replicas(router.replicas)
    assert router.affinity is None
    seen = set()
    for _ in range(60):
        rep = router.take("a")
        assert rep is not None
        seen.add(rep.replica_id)
        router.release(rep)
    assert len(seen) > 1  # power of two choices over all of them, as without the key


async def test_queued_call_waits_for_a_holder(router: Router) -> None:
    import asyncio

    r0, r1, r2 = router.replicas
    r0.mux_models = frozenset({"a", "b"})
    r1.mux_models = frozenset({"c", "d"})
    r2.mux_models = frozenset({"e", "f"})
    r0.in_flight = 2
    waiter = asyncio.ensure_future(router.acquire(5.0, model_id="a"))
    await asyncio.sleep(0.01)
    assert not waiter.done() and router.queued == 1  # no free slot anywhere: it waits
    router.release(r0)  # the holder frees up
    assert await asyncio.wait_for(waiter, 1) is r0
    assert not router._wanted
