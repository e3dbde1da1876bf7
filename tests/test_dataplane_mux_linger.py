"""Calls to a local replica share stream writes under load (gateway/dataplane/mux.py LINGER_S)
and a lone call is never held back; calls cancelled or expired while they wait never reach
the replica. A real grpc.aio server with the replica runtime's MuxServer, a real Replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from gateway.dataplane import mux as mux_mod
from gateway.dataplane.replicas import UNARY_UNARY, Replica
from tests.conftest import PredictRequest
from tests.test_dataplane_mux import PREDICT, _Counting, mux_replica


@contextlib.asynccontextmanager
async def local_replica() -> AsyncIterator[tuple[Replica, _Counting, list[int]]]:
    """The replica, its servicer, and the number of frames in each stream write."""
    servicer = _Counting()
    async with mux_replica(servicer) as rep:
        writes: list[int] = []
        send = rep.callable(PREDICT, UNARY_UNARY)
        await send(PredictRequest(text="warm").SerializeToString(), metadata=(), timeout=5)
        chan = rep._mux
        assert chan is not None and chan._stream is not None
        real_write = chan._stream.write

        async def counted(data: bytes) -> Any:
            writes.append(len(mux_mod.pb.MuxBatch.FromString(data).frames))
            return await real_write(data)

        chan._stream.write = counted
        yield rep, servicer, writes


def _call(rep: Replica, text: str, sleep_s: float = 0.0, timeout: float | None = 5) -> Any:
    send = rep.callable(PREDICT, UNARY_UNARY)
    return send(PredictRequest(text=text, sleep_s=sleep_s).SerializeToString(), metadata=(),
                timeout=timeout)


async def test_concurrent_calls_share_writes_and_a_lone_call_does_not_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux_mod, "LINGER_S", 0.2)  # wide, so the test does not race the clock
    async with local_replica() as (rep, servicer, writes):
        for i in range(5):  # one at a time: each goes out at once, alone
            assert await _call(rep, f"one{i}")
        assert writes == [1] * 5
        assert rep._mux is not None and rep._mux._linger is None
        holder = asyncio.ensure_future(_call(rep, "hold", sleep_s=0.5))
        await asyncio.sleep(0.05)
        writes.clear()
        calls = []
        for i in range(10):  # arriving 5 ms apart, with another call in flight
            calls.append(asyncio.ensure_future(_call(rep, f"c{i}")))
            await asyncio.sleep(0.005)
        assert all(await asyncio.gather(*calls))
        # Without the wait each would have had a write of its own (each write is done long
        # before the next call comes).
        assert writes == [10], writes
        assert await holder
        assert servicer.finished == 1 + 5 + 10 + 1


async def test_calls_cancelled_or_expired_while_waiting_never_reach_the_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux_mod, "LINGER_S", 0.3)  # long enough to act inside the wait
    async with local_replica() as (rep, servicer, _writes):
        holder = asyncio.ensure_future(_call(rep, "hold", sleep_s=1.0))
        await asyncio.sleep(0.4)  # its write is out; it is in flight at the replica
        started = servicer.started
        cancelled = asyncio.ensure_future(_call(rep, "cancel me"))
        expired = _call(rep, "too late", timeout=0.05)
        await asyncio.sleep(0.1)
        cancelled.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expired
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0.5)  # past the wait: anything still queued would be written now
        assert servicer.started == started, "a cancelled or expired call reached the replica"
        assert await holder
        assert await _call(rep, "after")  # the stream is fine


async def test_a_full_write_does_not_wait_out_the_linger(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux_mod, "LINGER_S", 30.0)
    async with local_replica() as (rep, _servicer, _writes):
        holder = asyncio.ensure_future(_call(rep, "hold", sleep_s=0.5))
        await asyncio.sleep(0.2)
        n = mux_mod.LINGER_MAX_FRAMES
        calls = [asyncio.ensure_future(_call(rep, f"f{i}", timeout=10)) for i in range(n)]
        done, _ = await asyncio.wait(calls, timeout=8)  # not 30 s: the write filled up
        assert len(done) == n and all(c.result() for c in calls)
        assert await holder


async def test_a_stream_that_ends_under_a_pending_write_leaves_the_channel_usable() -> None:
    """Breaker: the stream ending in the loop turn a flush task (or the linger timer) was
    started left `writing` set for good, and every later call waited for a write that never
    came. Both interleavings, made exactly, then real calls on the next stream."""
    async with local_replica() as (rep, _servicer, _writes):
        chan = rep._mux
        assert chan is not None
        for linger in (False, True):
            # With another call in flight the new one lingers; alone, its flush task starts.
            holder = asyncio.ensure_future(_call(rep, "hold", sleep_s=0.3)) if linger else None
            await asyncio.sleep(0.1)
            doomed = _call(rep, "doomed", timeout=5)  # a flush task or a linger, not run yet
            assert chan.writing
            assert (chan._linger is not None) is linger
            chan._broken(None)  # what the reader does when the stream ends, same turn
            for c in [doomed] + ([holder] if holder is not None else []):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not chan.writing
            assert chan._linger is None
            calls = [_call(rep, f"n{i}") for i in range(8)]
            got = await asyncio.wait_for(asyncio.gather(*calls), 10)
            assert all(got)


async def test_one_slow_call_in_flight_does_not_slow_every_lone_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaker: one long call in flight made each one-at-a-time call wait LINGER_S, though
    no other call ever joined its write. After LINGER_MISSES such waits, calls stop waiting."""
    monkeypatch.setattr(mux_mod, "LINGER_BACKOFF_S", 30.0)
    async with local_replica() as (rep, _servicer, _writes):
        chan = rep._mux
        assert chan is not None
        holder = asyncio.ensure_future(_call(rep, "hold", sleep_s=2.0))
        await asyncio.sleep(0.1)
        lingered = []
        for i in range(12):
            call = _call(rep, f"seq{i}")
            lingered.append(chan._linger is not None)
            assert await call
        assert lingered[:mux_mod.LINGER_MISSES] == [True] * mux_mod.LINGER_MISSES
        assert not any(lingered[mux_mod.LINGER_MISSES:]), lingered
        assert await holder


async def test_calls_that_expire_behind_a_stalled_write_leave_the_queue() -> None:
    """A replica that takes no write (stopped, or its flow-control window full) must not make
    the queue keep the frames, payloads and all, of calls that expired before they left."""
    async with local_replica() as (rep, _, _):
        chan = rep._mux
        assert chan is not None and chan._stream is not None
        stalled = chan._stream.write
        release = asyncio.Event()

        async def stuck(data: bytes) -> Any:
            await release.wait()  # the write the replica does not take
            return await stalled(data)

        chan._stream.write = stuck
        big = "x" * (64 << 10)
        for _ in range(5):  # waves: each expires, and makes room for the next
            calls = [asyncio.ensure_future(_call(rep, big, timeout=0.05)) for _ in range(20)]
            done = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(e, grpc.aio.AioRpcError)
                       and e.code() is grpc.StatusCode.DEADLINE_EXCEEDED for e in done)
        # The stuck write took the first wave: the replica may yet get those, so their
        # CANCELs wait. The later waves (80 calls) never left: a few of their frames at most
        # wait for the next rebuild of the queue.
        assert not chan._calls
        cancels = [f for f in chan._pending if f.kind == mux_mod.CANCEL]
        assert len(cancels) <= 20
        assert len(chan._pending) - len(cancels) <= 2 * mux_mod.DEAD_MIN
        release.set()
        chan._stream.write = stalled
        assert await _call(rep, "after")
