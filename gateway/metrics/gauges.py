"""Gauges read from live state at collection: replicas, queues, calls in flight, memory and CPU.

Read-only views of other parts (the controller's replicas and queues, the proxy's counters,
the processes): nothing here runs on the call path. Reader threads call these while the loop
runs, so every walk starts from a `list()` copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil
from opentelemetry.metrics import Observation

from gateway.control.state import ReplicaSlot
from gateway.dataplane.replicas import ROUTABLE
from gateway.hooks import RunningGateway


class LiveGauges:
    """The observable gauges' callbacks, and the replica start counter's."""

    def __init__(self, gateway: RunningGateway, actor_id: str, node_id: str,
                 handle: Callable[[str, str], str]) -> None:
        self._gw = gateway
        self.actor_id = actor_id
        self.node_id = node_id
        self._handle = handle
        self.slots: dict[str, ReplicaSlot] = {}
        """The replicas to report (kept by `Telemetry.on_replica_event`)."""
        self._procs: dict[int, psutil.Process] = {}
        self.http_calls_ongoing: Callable[[], int] = lambda: 0
        """Calls in the proxy that came over HTTP: not ongoing gRPC requests (set by app.py)."""

    def slot_list(self) -> list[ReplicaSlot]:
        return list(self.slots.values())

    @staticmethod
    def _replica_attrs(slot: ReplicaSlot) -> dict[str, str]:
        return {"application": slot.application, "deployment": slot.deployment,
                "replica": slot.replica_id}

    def replica_starts(self) -> list[Observation]:
        return [Observation(s.starts, self._replica_attrs(s)) for s in self.slot_list()]

    def healthy(self) -> list[Observation]:
        out = []
        for s in self.slot_list():
            ok = s.state in ROUTABLE
            out.append(Observation(1 if ok else 0, self._replica_attrs(s)))
        return out

    def processing(self) -> list[Observation]:
        out = []
        for s in self.slot_list():
            rep = s.replica
            out.append(Observation(rep.in_flight if rep is not None else 0,
                                   self._replica_attrs(s)))
        return out

    def pending(self) -> list[Observation]:
        return [Observation(0, self._replica_attrs(s)) for s in self.slot_list()]

    def ongoing(self) -> list[Observation]:
        ongoing = max(0, self._gw.proxy.ongoing - self.http_calls_ongoing())
        return [Observation(ongoing, {
            "node_id": self.node_id, "node_ip_address": self._gw.config.proxy.host})]

    def _deployments(self) -> list[tuple[str, str, int]]:
        out = []
        for app in list(self._gw.controller.apps.values()):
            for dep in list(app.deployments.values()):
                out.append((app.name, dep.name, dep.router.queued))
        return out

    def queued(self) -> list[Observation]:
        return [
            Observation(q, {"actor_id": self.actor_id, "application": a, "deployment": d,
                            "handle": self._handle(a, d)})
            for a, d, q in self._deployments()
        ]

    def scheduling(self) -> list[Observation]:
        # Ray's router has one scheduling task per request waiting for a replica; here that is
        # a call in the deployment's queue (it waits because every replica is at capacity).
        return [
            Observation(q, {"actor_id": self.actor_id, "app": a, "application": a,
                            "deployment": d, "handle_source": "PROXY"})
            for a, d, q in self._deployments()
        ]

    def _memory(self) -> list[tuple[dict[str, str], float, float]]:
        """(attributes, rss bytes, shared bytes) for the gateway and each local replica."""
        ip = self._gw.config.proxy.host
        procs: list[tuple[str, int]] = [("ray::ProxyActor", os.getpid())]
        for s in self.slot_list():
            pid = s.pid
            if pid is not None and s.target is None:
                procs.append((f"ray::ServeReplica:{s.application}:{s.deployment}", pid))
        out = []
        alive: dict[int, psutil.Process] = {}
        for component, pid in procs:
            p = self._procs.get(pid)
            try:
                if p is None:
                    p = psutil.Process(pid)
                mem = p.memory_info()
            except (psutil.Error, OSError):
                continue  # it just exited: nothing to report
            alive[pid] = p
            out.append(({"Component": component, "ip": ip, "pid": str(pid)},
                        float(mem.rss), float(getattr(mem, "shared", 0))))
        self._procs = alive
        return out

    def rss(self) -> list[Observation]:
        return [Observation(rss / 1e6, a) for a, rss, _ in self._memory()]

    def shared(self) -> list[Observation]:
        return [Observation(shared, a) for a, _, shared in self._memory()]

    def cpu(self) -> list[Observation]:
        # psutil measures from this Process object's previous call (kept in self._procs by
        # _memory, which runs first in a collection), so each scrape sees its own interval;
        # a process seen for the first time reports 0.
        out = []
        for a, _, _ in self._memory():
            p = self._procs.get(int(a["pid"]))
            try:
                out.append(Observation(p.cpu_percent(None) if p is not None else 0.0, a))
            except (psutil.Error, OSError):
                continue
        return out


