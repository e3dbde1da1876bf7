"""The local replicas' own (custom) metrics, fetched over `ReplicaControl.CollectMetrics` while
a scrape waits, so one scrape of the gateway shows them with its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from gateway.control.state import ReplicaSlot
from gateway.dataplane.replicas import ReplicaState
from gateway.pb import replica_control_pb2, replica_control_pb2_grpc

log = logging.getLogger("gateway.telemetry")

REPLICA_FETCH_TIMEOUT_S = 2.0
"""How long a scrape waits for the local replicas' own (custom) metrics."""


class ReplicaScrape:
    """`expositions()` from a reader thread; the RPCs run on the gateway's loop."""

    def __init__(self, slots: Callable[[], list[ReplicaSlot]]) -> None:
        self._slots = slots
        self.loop: asyncio.AbstractEventLoop | None = None
        """The gateway's loop (set when the telemetry starts)."""

    def expositions(self) -> list[str]:
        """Prometheus text of every running local replica's custom metrics.

        Called from a reader thread: the RPCs run on the gateway's loop and are waited for
        here, bounded by REPLICA_FETCH_TIMEOUT_S."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return []
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                return []  # called on the loop itself: waiting here would block it
        fut = asyncio.run_coroutine_threadsafe(self._fetch_expositions(), loop)
        try:
            return fut.result(REPLICA_FETCH_TIMEOUT_S + 0.5)
        except Exception:
            fut.cancel()
            return []

    async def _fetch_expositions(self) -> list[str]:
        slots = [s for s in self._slots()
                 if s.target is None and s.replica is not None
                 and s.state is ReplicaState.RUNNING]

        async def one(slot: ReplicaSlot) -> str:
            rep = slot.replica
            if rep is None:
                return ""
            stub = replica_control_pb2_grpc.ReplicaControlStub(rep.channel)
            try:
                resp = await stub.CollectMetrics(
                    replica_control_pb2.CollectMetricsRequest(), timeout=REPLICA_FETCH_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                log.debug("replica %s metrics: %s", slot.replica_id, e.code().name)
                return ""
            return str(resp.exposition)

        with contextlib.suppress(asyncio.CancelledError):
            texts = await asyncio.gather(*(one(s) for s in slots))
            return [t for t in texts if t]
        return []
