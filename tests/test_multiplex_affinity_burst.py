"""A burst of calls for a new model waits for the replica loading it instead of loading it on
every replica at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.dataplane.replicas import Replica, ReplicaState
from gateway.dataplane.router import Router


async def replicas(n: int) -> list[Replica]:
    reps = []
    for i in range(n):
        rep = Replica("mx", "MuxText", f"r{i}", f"127.0.0.1:{1 + i}", 1 << 20, is_local=True)
        rep.state = ReplicaState.RUNNING
        rep.mux_capacity = 2
        reps.append(rep)
    return reps


@pytest.fixture
async def reps() -> AsyncIterator[list[Replica]]:
    rs = await replicas(3)
    yield rs
    for rep in rs:
        await rep.close()


@pytest.mark.parametrize(("max_ongoing", "burst"), [(5, 15), (1, 3)])
async def test_burst_for_a_new_model_stays_on_the_replica_loading_it(
    reps: list[Replica], max_ongoing: int, burst: int
) -> None:
    router = Router("mx", "MuxText", max_ongoing=max_ongoing, max_queued=100)
    router.set_replicas(reps)
    got = [router.take("new-model") for _ in range(burst)]
    taken = [r for r in got if r is not None]
    assert len({r.replica_id for r in taken}) == 1
    assert len(taken) == max_ongoing  # the rest wait for it
    assert router.affinity is not None
    assert router.affinity._placed["new-model"][0] is taken[0]  # the placement stands


async def test_once_reported_a_busy_holder_spills_to_a_free_slot(reps: list[Replica]) -> None:
    router = Router("mx", "MuxText", max_ongoing=1, max_queued=100)
    router.set_replicas(reps)
    first = router.take("m")
    assert first is not None
    first.mux_models = frozenset({"m"})  # the load finished: a hot model may load elsewhere
    second = router.take("m")
    assert second is not None and second is not first


async def test_a_confirmed_placement_is_not_counted_twice(reps: list[Replica]) -> None:
    a, b = reps[0], reps[1]
    router = Router("mx", "MuxText", max_ongoing=10, max_queued=10)
    router.set_replicas([a, b])

    def call(mid: str) -> Replica:
        r = router.take(mid)
        assert r is not None
        r.mux_models = r.mux_models | {mid}  # the replica's report with the result
        return r

    first, second = call("m1"), call("m2")
    assert {first, second} == {a, b}
    holder3 = call("m3")
    other = b if holder3 is a else a
    for r in (a, b):
        r.in_flight = 0
    other.in_flight = 1  # busy, but with a free model slot
    # holder3 is full (2 models); the other has one model and a free slot: m4 goes there.
    assert router.take("m4") is other
