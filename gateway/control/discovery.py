"""DNS-discovered replicas: `targets: ["dns:///name:port"]`.

Every address the name resolves to is an external replica of its own (its own health checks,
status row and metric series; its replica id, the `replica` label, is the address). The
name is resolved again every `dns_refresh_s` and soon after one of its replicas cannot be
reached. A new address joins as a STARTING replica and takes calls once a health check
passes; an address gone from the answer drains (no new calls, calls in flight finish within
`graceful_shutdown_timeout_s`) and leaves. A failed lookup changes nothing: the replicas
already known keep serving (their health checks say whether they still can), and the
deployment's message says what failed.

The controller owns the slots; this module only decides which addresses should have one,
through the two functions it is given (the controller's own `_new_slot` / `_stop_slot`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from gateway.config import dns_name
from gateway.control.state import DeploymentState, ReplicaSlot
from gateway.dataplane.replicas import ReplicaState

log = logging.getLogger("gateway.discovery")

Resolve = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the `host:port` addresses it resolves to now (raises when the lookup fails)."""

NewSlot = Callable[[DeploymentState, str | None, str | None], ReplicaSlot]
StopSlot = Callable[[DeploymentState, ReplicaSlot], Awaitable[None]]

MIN_KICK_INTERVAL_S = 1.0
"""A replica failing its health checks asks for a lookup each time; at most one per second,
doubling (up to dns_refresh_s) while the answer stays the same (an address that stays in DNS
but cannot be reached must not cost a lookup a second forever)."""
LOOKUP_TIMEOUT_S = 10.0
ROLL_LOOKUP_TIMEOUT_S = 5.0
"""A deploy waits this long for a `dns:///` name it rolls to (then the roll stops)."""
ABANDON_LOOKUP_S = 6 * LOOKUP_TIMEOUT_S
"""A lookup stuck this long is left to its thread; the next refresh starts a new one."""
LOOKUP_THREADS = 4
"""Discovery's own threads: hung lookups must not starve asyncio's default executor."""
MAX_ADDRESSES = 256
"""Replicas one name may add (a runaway answer must not start thousands of health loops)."""


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def system_resolve(host: str, port: int, executor: Executor | None = None) -> list[str]:
    """The system resolver (/etc/hosts, /etc/resolv.conf), off the event loop: getaddrinfo
    runs in `executor` (Discovery's own; asyncio's default one when None)."""
    def lookup() -> list[Any]:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)

    infos = await asyncio.get_running_loop().run_in_executor(executor, lookup)
    return sorted({join_host_port(str(info[4][0]), port) for info in infos})


class _Watch:
    """One `dns:///` target of one deployment: its refresh task and what wakes it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.kick = asyncio.Event()
        self.last_lookup = 0.0
        self.error = ""
        self.task: asyncio.Task[None] | None = None
        self.lookup: asyncio.Future[list[str]] | None = None
        self.lookup_started = 0.0
        self.kick_interval = MIN_KICK_INTERVAL_S
        self.answer: list[str] | None = None


class Discovery:
    """Keeps each deployment's DNS-discovered slots in line with what its names resolve to."""

    def __init__(self, new_slot: NewSlot, stop_slot: StopSlot,
                 resolve: Resolve | None = None) -> None:
        self._executor = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="gateway-dns")
        self.resolve: Resolve = resolve or self._system_resolve
        """Replaceable (tests use a resolver they control)."""
        self._new_slot = new_slot
        self._stop_slot = stop_slot
        self._watches: dict[DeploymentState, dict[str, _Watch]] = {}
        self._drains: set[asyncio.Task[None]] = set()

    @staticmethod
    def static_targets(targets: list[str] | None) -> list[str]:
        """The plain `host:port` targets (one slot each, as before)."""
        return [t for t in targets or [] if dns_name(t) is None]

    def names(self, dep: DeploymentState) -> list[str]:
        """The `dns:///` targets `dep` is watching now (sorted)."""
        return sorted(self._watches.get(dep, {}))

    def watch(self, dep: DeploymentState) -> None:
        """Watch the `dns:///` targets of `dep.config`, and the names slots it has came from
        (a stopped roll leaves some), and stop watching any others."""
        wanted = sorted({t for t in dep.config.targets or [] if dns_name(t) is not None}
                        | {s.source for s in dep.slots if s.source and not s.stopping})
        watches = self._watches.setdefault(dep, {})
        for target in [t for t in watches if t not in wanted]:
            self._unwatch(dep, target)
        for target in wanted:
            if target not in watches:
                w = watches[target] = _Watch(target)
                w.task = asyncio.ensure_future(self._run(dep, w))
        if not watches:
            self._watches.pop(dep, None)
        self._note(dep)

    def forget(self, dep: DeploymentState) -> None:
        """Stop watching `dep`'s names (its slots stay: the caller stops them)."""
        for target in list(self._watches.get(dep, {})):
            self._unwatch(dep, target)
        self._watches.pop(dep, None)
        dep.discovery_pending = False
        dep.discovery_error = ""

    def kick(self, dep: DeploymentState) -> None:
        """A replica of `dep` could not be reached: look its names up again soon."""
        for w in self._watches.get(dep, {}).values():
            w.kick.set()

    async def expand(self, targets: list[str]
                     ) -> tuple[list[tuple[str, str | None]], list[str]]:
        """(address, source) for each target, `dns:///` names resolved once now (for a
        rolling change), and what went wrong: a name that fails, hangs past
        ROLL_LOOKUP_TIMEOUT_S or resolves to nothing (the roll must not go ahead then: it
        would stop the serving replicas and start none)."""
        names = [n for n in (dns_name(t) for t in targets) if n is not None]
        if names:
            log.info("resolving %s for a rolling change", [t for t in targets
                                                           if dns_name(t) is not None])
        found = await asyncio.gather(*(
            asyncio.wait_for(self.resolve(*n), ROLL_LOOKUP_TIMEOUT_S) for n in names),
            return_exceptions=True)
        answers = dict(zip(names, found, strict=True))
        out: list[tuple[str, str | None]] = []
        errors: list[str] = []
        for target in targets:
            name = dns_name(target)
            if name is None:
                out.append((target, None))
                continue
            got = answers[name]
            if isinstance(got, BaseException):
                errors.append(f"{target}: {_why(got, ROLL_LOOKUP_TIMEOUT_S)}")
            elif not got:
                errors.append(f"{target}: the name resolves to no address")
            else:
                out += [(a, target) for a in got[:MAX_ADDRESSES]]
        return out, errors

    async def close(self) -> None:
        """Stop looking names up; replicas already draining finish their drain (bounded by
        their graceful_shutdown_timeout_s), so none is left half-stopped."""
        for dep in list(self._watches):
            self.forget(dep)
        await asyncio.gather(*self._drains, return_exceptions=True)
        # Threads stuck in getaddrinfo cannot be stopped; they are not waited for either.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- inside ------------------------------------------------------------------------

    async def _system_resolve(self, host: str, port: int) -> list[str]:
        return await system_resolve(host, port, self._executor)

    def _unwatch(self, dep: DeploymentState, target: str) -> None:
        w = self._watches.get(dep, {}).pop(target, None)
        if w is not None and w.task is not None:
            w.task.cancel()

    def _note(self, dep: DeploymentState) -> None:
        watches = self._watches.get(dep, {}).values()
        dep.discovery_pending = any(w.last_lookup == 0.0 for w in watches)
        dep.discovery_error = "; ".join(w.error for w in watches if w.error)

    async def _lookup(self, w: _Watch) -> list[str]:
        name = dns_name(w.target)
        assert name is not None
        if w.lookup is not None and w.lookup.done():
            # It finished after its wait timed out: its answer, or the real reason it failed.
            done, w.lookup = w.lookup, None
            return done.result()
        if w.lookup is not None and time.monotonic() - w.lookup_started > ABANDON_LOOKUP_S:
            w.lookup = None  # stuck for good: it must not hold every later refresh
        # A lookup stuck in the resolver is waited for, not started again at each refresh:
        # the thread it holds cannot be cancelled.
        if w.lookup is None:
            w.lookup = asyncio.ensure_future(self.resolve(*name))
            w.lookup.add_done_callback(_retrieve)
            w.lookup_started = time.monotonic()
        addrs = await asyncio.wait_for(asyncio.shield(w.lookup), LOOKUP_TIMEOUT_S)
        w.lookup = None
        return addrs

    async def _run(self, dep: DeploymentState, w: _Watch) -> None:
        kicked = False
        try:
            while True:
                try:
                    addrs = await self._lookup(w)
                    w.error = "" if addrs else f"{w.target}: the name resolves to no address"
                    if len(addrs) > MAX_ADDRESSES:
                        log.warning("deployment %s/%s: %s resolves to %d addresses; using "
                                    "the first %d", dep.app, dep.name, w.target, len(addrs),
                                    MAX_ADDRESSES)
                        addrs = addrs[:MAX_ADDRESSES]
                except Exception as e:  # any failure of one lookup: try again next period
                    addrs = []
                    w.error = f"{w.target}: {_why(e, LOOKUP_TIMEOUT_S)}"
                if w.error:
                    log.warning("deployment %s/%s: %s; keeping the replicas it had",
                                dep.app, dep.name, w.error)
                else:
                    self._sync(dep, w.target, addrs)
                    # Kicks back off while they find the same answer; a new answer resets.
                    if addrs != w.answer:
                        w.kick_interval = MIN_KICK_INTERVAL_S
                    elif kicked:
                        w.kick_interval = min(2 * w.kick_interval, dep.config.dns_refresh_s)
                    w.answer = addrs
                w.last_lookup = time.monotonic()
                self._note(dep)
                w.kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.kick.wait(), dep.config.dns_refresh_s)
                kicked = w.kick.is_set()
                # Kicked: no sooner than kick_interval after the last lookup.
                wait = w.last_lookup + w.kick_interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("deployment %s/%s: discovery of %s failed", dep.app, dep.name,
                          w.target)

    def _sync(self, dep: DeploymentState, target: str, addrs: list[str]) -> None:
        mine = [s for s in dep.slots if s.source == target]
        # An address still draining from an earlier answer comes back with the next lookup
        # after it has left (two slots of one address would share a replica id).
        present = {s.target for s in mine}
        added = [a for a in addrs if a not in present]
        for address in added:
            self._new_slot(dep, address, target)
        gone = [s for s in mine if not s.stopping and s.target not in addrs]
        for slot in gone:
            task = asyncio.ensure_future(self._drain(dep, slot))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        if added or gone:
            log.info("deployment %s/%s: %s resolves to %s (added %s, draining %s)",
                     dep.app, dep.name, target, addrs, added, [s.target for s in gone])

    async def _drain(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        """No new calls (out of routing at once), calls in flight finish, then it leaves."""
        slot.stopping = True
        slot.set_state(ReplicaState.STOPPING)
        dep.router.set_replicas([s.replica for s in dep.slots
                                 if s.replica is not None and not s.stopping])
        try:
            await self._stop_slot(dep, slot)
        finally:
            if slot in dep.slots:
                dep.slots.remove(slot)
            dep.publish()
            dep.router.wake()


def _why(e: BaseException, timeout: float) -> str:
    """A failed lookup, said plainly."""
    if isinstance(e, TimeoutError):
        return f"lookup timed out after {timeout:g} s"
    why = (e.strerror if isinstance(e, OSError) else None) or str(e)
    return f"lookup failed: {why or type(e).__name__}"


def _retrieve(fut: asyncio.Future[list[str]]) -> None:
    """Marks a lookup's failure as seen (it may finish after its waiter gave up; asyncio
    would log 'exception was never retrieved'); _lookup reports it at the next refresh."""
    if not fut.cancelled():
        fut.exception()
