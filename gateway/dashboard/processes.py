"""The seed's actors view: the gateway and every replica process, alive or dead.

A controller listener learns each replica process when it starts; the control loop notices
when one has exited (its exit code, when) and samples memory now and then. A dead process stays
listed for `DEAD_KEEP_S` after it died (its slot usually has a new process by then), and at
most `MAX_DEAD` of them, so the table is bounded whatever crash loop it watches.

Each replica also keeps its recent events (state changes, health checks), bounded.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from gateway.control.state import ReplicaSlot

DEAD_KEEP_S = 600.0
MAX_DEAD = 50
MAX_EVENTS = 50
"""Recent events kept per replica."""
MAX_REPLICAS = 2000
"""Replica histories kept (ids are new only when a slot is created)."""
MEMORY_EVERY_S = 5.0


@dataclass
class Proc:
    pid: int
    kind: str
    """"gateway" or "replica"."""
    name: str
    """The replica id (app#deployment#suffix) or "gateway"."""
    application: str = ""
    deployment: str = ""
    started_at: float = field(default_factory=time.time)
    exit_code: int | None = None
    died_at: float | None = None
    rss_bytes: int | None = None
    uss_bytes: int | None = None
    """RSS minus shared pages (what the process holds alone; the seed's suggestion)."""
    log_file: str = ""
    handle: Any = None
    """The asyncio process object (replicas), to read its exit code."""
    _ps: psutil.Process | None = None

    @property
    def alive(self) -> bool:
        return self.died_at is None

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "kind": self.kind, "name": self.name,
                "application": self.application, "deployment": self.deployment,
                "alive": self.alive, "started_at": self.started_at,
                "exit_code": self.exit_code, "died_at": self.died_at,
                "rss_bytes": self.rss_bytes, "rss_minus_shared_bytes": self.uss_bytes,
                "log_file": self.log_file}


@dataclass
class Event:
    t: float
    event: str
    state: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "event": self.event, "state": self.state, "message": self.message}


class ProcessTable:
    """`on_replica_event` is a controller listener; `tick()` runs in the control loop."""

    def __init__(self, gateway_log: Path | None, replica_log: Any) -> None:
        """`replica_log(replica_id) -> Path` names a replica's log file."""
        self._replica_log = replica_log
        self.procs: dict[int, Proc] = {}
        me = Proc(os.getpid(), "gateway", "gateway", started_at=_started(os.getpid()),
                  log_file=str(gateway_log or ""))
        self.procs[me.pid] = me
        self.events: dict[str, deque[Event]] = {}
        self.started_at: dict[str, float] = {}
        """Replica id -> when its current process started (unix seconds)."""
        self._memory_due = 0.0

    # -- controller listener --------------------------------------------------------------

    def on_replica_event(self, event: str, slot: ReplicaSlot) -> None:
        rid = slot.replica_id
        if event == "started":
            self.started_at[rid] = time.time()
            if slot.process is not None:
                pid = slot.process.pid
                self.procs[pid] = Proc(pid, "replica", rid, slot.application, slot.deployment,
                                       log_file=str(self._replica_log(rid)),
                                       handle=slot.process)
        if event == "stopped":
            self.started_at.pop(rid, None)  # ids are not reused: keep the dict bounded
        if event == "checked":
            ok = slot.failures == 0
            self._event(rid, "health check " + ("passed" if ok else "failed"),
                        slot.state.value, "" if ok else slot.message)
            return
        self._event(rid, event, slot.state.value, slot.message)

    def _event(self, rid: str, event: str, state: str, message: str) -> None:
        ring = self.events.get(rid)
        if ring is None:
            if len(self.events) >= MAX_REPLICAS:
                self.events.pop(next(iter(self.events)))
            ring = self.events[rid] = deque(maxlen=MAX_EVENTS)
        if (event.startswith("health check passed") and ring
                and ring[-1].event == event and ring[-1].state == state):
            ring[-1] = Event(time.time(), event, state, message)  # one line, kept fresh
            return
        ring.append(Event(time.time(), event, state, message))

    # -- control loop ---------------------------------------------------------------------

    def tick(self) -> None:
        now = time.time()
        for p in list(self.procs.values()):
            if p.alive and p.handle is not None and p.handle.returncode is not None:
                p.exit_code = p.handle.returncode
                p.died_at = now
                p.handle = None
                p._ps = None
                self._event(p.name, "process exited", "", f"pid {p.pid} exit code "
                                                          f"{p.exit_code}")
        dead = sorted((p for p in self.procs.values() if not p.alive),
                      key=lambda p: p.died_at or 0.0)
        for i, p in enumerate(dead):
            if len(dead) - i > MAX_DEAD or (p.died_at or 0) < now - DEAD_KEEP_S:
                del self.procs[p.pid]
        if now >= self._memory_due:
            self._memory_due = now + MEMORY_EVERY_S
            self.sample_memory()

    def sample_memory(self) -> None:
        for p in list(self.procs.values()):
            if not p.alive:
                continue
            try:
                if p._ps is None:
                    p._ps = psutil.Process(p.pid)
                mem = p._ps.memory_info()
            except (psutil.Error, OSError):
                continue
            p.rss_bytes = int(mem.rss)
            shared = getattr(mem, "shared", None)
            p.uss_bytes = int(mem.rss - shared) if shared is not None else None

    # -- readers --------------------------------------------------------------------------

    def all(self) -> list[Proc]:
        return sorted(self.procs.values(),
                      key=lambda p: (p.kind != "gateway", not p.alive, p.name, p.started_at))

    def by_replica(self, replica_id: str) -> Proc | None:
        live = [p for p in self.procs.values() if p.name == replica_id and p.alive]
        return live[-1] if live else None

    def recent(self, replica_id: str) -> list[Event]:
        return list(self.events.get(replica_id, ()))


def _started(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return time.time()
