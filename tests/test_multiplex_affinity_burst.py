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
