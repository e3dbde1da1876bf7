"""Replica choice for one deployment: power of two choices on in-flight calls.

A replica takes at most `max_ongoing_requests` calls at once; when every replica is full, calls
wait in a bounded FIFO queue and the first one is handed the replica that frees up first.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque

from gateway.dataplane import errors
from gateway.dataplane.model_affinity import ModelAffinity
from gateway.dataplane.replicas import Replica


class Router:
    __slots__ = (
        "_rng",
        "_waiters",
        "_wanted",
        "affinity",
        "application",
        "deployment",
        "known_method_seen",
        "max_ongoing",
        "max_queued",
        "methods_known",
        "replicas",
        "unknown_method",
    )

    def __init__(
        self, application: str, deployment: str, max_ongoing: int, max_queued: int
    ) -> None:
        self.application = application
        self.deployment = deployment
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.replicas: list[Replica] = []
        """Every replica of the deployment; only routable ones get calls."""
        self.methods_known = False
        """True once every method the replicas serve is known (local replicas, by reflection)."""
        self.unknown_method = ""
        self.known_method_seen = False
        """True once a replica answered a call to a method the gateway knows (its shape): then
        a deployment without reflection is not warned about (gateway/dataplane/
        method_warnings.py)."""
        """The first method called through this router that the gateway did not know."""
        self._rng = random.Random()
        self._waiters: deque[asyncio.Future[Replica]] = deque()
        self._wanted: dict[asyncio.Future[Replica], str] = {}
        """The model id of queued calls that carry one."""
        self.affinity: ModelAffinity | None = None
        """Set while a replica serves multiplexed models: calls with a model id route by it."""

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def set_replicas(self, replicas: list[Replica]) -> None:
        self.replicas = list(replicas)
        if any(r.mux_capacity is not None for r in self.replicas):
            self.affinity = self.affinity or ModelAffinity()
        else:
            self.affinity = None
        self.wake()

    def _pick(self, model_id: str | None = None) -> Replica | None:
        if model_id is not None and self.affinity is not None:
            return self.affinity.pick(self, model_id)
        reps = self.replicas
        n = len(reps)
        if n == 1:
            r = reps[0]
            return r if r.routable and r.in_flight < self.max_ongoing else None
        if n == 0:
            return None
        a, b = self._rng.sample(reps, 2)
        if a.routable and b.routable:
            best = a if a.in_flight <= b.in_flight else b
        else:
            best = a if a.routable else b
        if best.routable and best.in_flight < self.max_ongoing:
            return best
        # Both sampled replicas are full or down: take the least loaded one with room.
        free = [r for r in reps if r.routable and r.in_flight < self.max_ongoing]
        return min(free, key=lambda r: r.in_flight) if free else None

    def has_routable(self) -> bool:
        return any(r.routable for r in self.replicas)

    def take(self, model_id: str | None = None) -> Replica | None:
        """A replica with room right now (counted as in flight), or None."""
        if self._waiters:
            return None  # first come, first served: the queue goes first
        r = self._pick(model_id)
        if r is not None:
            r.in_flight += 1
        return r

    async def acquire(self, timeout: float | None, exclude: Replica | None = None,
                      model_id: str | None = None) -> Replica:
        """A replica with room, counted as in flight; raises a `GatewayError` otherwise."""
        r = self._pick(model_id)
        if r is not None and r is not exclude:
            r.in_flight += 1
            return r
        if not self.has_routable():
            raise errors.no_healthy_replica(self.application, self.deployment)
        if r is exclude and r is not None:
            # A retry: prefer any other replica with room; when none has room, the excluded
            # one again (as Envoy's previous_hosts predicate falls back) rather than queue
            # behind a replica that has room, possibly forever.
            others = [
                x for x in self.replicas
                if x is not exclude and x.routable and x.in_flight < self.max_ongoing
            ]
            pick = min(others, key=lambda x: x.in_flight) if others else r
            pick.in_flight += 1
            return pick
        if len(self._waiters) >= self.max_queued:
            raise errors.queue_full(self.application, self.deployment, self.max_queued)
        fut: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if model_id is not None and self.affinity is not None:
            self._wanted[fut] = model_id
        try:
            if timeout is None:
                rep = await fut
            else:
                rep = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (asyncio.CancelledError, TimeoutError) as e:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a replica just as we gave up: give it back.
                self.release(fut.result())
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(e, TimeoutError):
                raise errors.deadline_in_queue(self.application, self.deployment) from None
            raise
        finally:
            if self._wanted:
                self._wanted.pop(fut, None)
        return rep

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if self._waiters:
            self.wake()

    def wake(self) -> None:
        """Hand replicas with room to waiting calls, oldest first. A call that cannot be
        served yet (its model's holders are busy) does not hold up the calls behind it that
        can (head-of-line); plain calls stay in order among themselves."""
        if not self._waiters:
            return
        if not self.has_routable():
            # Nothing will free up: fail the waiters rather than let them hang.
            err = errors.no_healthy_replica(self.application, self.deployment)
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(err)
            return
        kept: deque[asyncio.Future[Replica]] = deque()
        plain_blocked = False
        waiters = self._waiters
        while waiters:
            if not any(r.routable and r.in_flight < self.max_ongoing for r in self.replicas):
                break  # no room anywhere: the rest keep their places
            fut = waiters.popleft()
            if fut.done():
                continue
            mid = self._wanted.get(fut) if self._wanted and self.affinity is not None else None
            if mid is None and plain_blocked:
                kept.append(fut)
                continue
            try:
                r = self._pick(mid)
            except errors.GatewayError as e:  # its model id is bad: fail that call only
                fut.set_exception(e)
                continue
            if r is None:
                plain_blocked = plain_blocked or mid is None
                kept.append(fut)
                continue
            r.in_flight += 1
            fut.set_result(r)
        kept.extend(waiters)
        self._waiters = kept
