"""A queued call waiting for its model's busy holder does not hold up the queued calls behind
it that an idle replica can serve."""

from __future__ import annotations

import asyncio

from gateway.dataplane.replicas import Replica, ReplicaState
from gateway.dataplane.router import Router


async def test_a_plain_call_behind_a_model_call_gets_the_idle_replica() -> None:
    reps = []
    for i, models in enumerate(({"M"}, {"N"})):
        rep = Replica("mx", "MuxText", f"r{i}", f"127.0.0.1:{1 + i}", 1 << 20, is_local=True)
        rep.state = ReplicaState.RUNNING
        rep.mux_capacity = 1
        rep.mux_models = frozenset(models)
        reps.append(rep)
    a, b = reps
    try:
        router = Router("mx", "MuxText", max_ongoing=1, max_queued=100)
        router.set_replicas(reps)
        assert router.take("M") is a and router.take(None) is b  # both busy
        q_m = asyncio.ensure_future(router.acquire(5.0, model_id="M"))
        await asyncio.sleep(0)
        q_plain = asyncio.ensure_future(router.acquire(5.0))
        await asyncio.sleep(0)
        router.release(b)  # b is idle: the plain call takes it; M's call waits for a
        assert await asyncio.wait_for(q_plain, 2) is b
        assert not q_m.done() and router.queued == 1
        router.release(a)
        assert await asyncio.wait_for(q_m, 2) is a
        assert router.queued == 0
    finally:
        for rep in reps:
            await rep.close()
