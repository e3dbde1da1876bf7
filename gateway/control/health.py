"""Health of every replica: periodic `grpc.health.v1` checks, the rotation they decide, and what
the first healthy replica publishes (its methods, through reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.control.reconfigure import Reconfigurer
from gateway.control.state import (
    DeploymentState,
    ReplicaSlot,
)
from gateway.dataplane.method_warnings import has_method_sources, no_reflection_warning
from gateway.dataplane.methods import fetch_reflection
from gateway.dataplane.replicas import Replica, ReplicaState

log = logging.getLogger("gateway.controller")

CHECK_GRACE_S = 0.5
"""Past its grpc deadline, a health check is given up by the gateway itself."""


class HealthChecks(Reconfigurer):
    """Checks each replica on its period and moves it in and out of rotation."""

    def _set_health(self, dep: DeploymentState, slot: ReplicaSlot, ok: bool, why: str) -> None:
        if slot.stopping or slot.reconfiguring:
            return
        if ok:
            slot.failures = 0
            stale = slot.user_config != dep.config.user_config
            if stale and slot.reconfigure_failures:
                # Its last reconfigure failed: it stays out until one succeeds (backed off).
                if time.monotonic() >= slot.reconfigure_retry_at:
                    self._background(self._reconfigure_slot(dep, slot))
                return
            rep_state = slot.replica.state if slot.replica is not None else slot.state
            if slot.state is not ReplicaState.RUNNING or rep_state is not ReplicaState.RUNNING:
                slot.set_state(ReplicaState.RUNNING, "")
                if not slot.running_since:
                    slot.running_since = time.monotonic()
                # crashes stays: only a run longer than RESTART_RESET_AFTER_S resets the
                # back-off (_run_local), or a replica dying soon after each start never
                # backs off.
                dep.note_health()
                log.info("replica %s is healthy", slot.replica_id)
                if not dep.reflected and slot.replica is not None:
                    dep.reflected = True
                    self._background(self._reflect(dep, slot.replica))
                self._emit("healthy", slot)
                if stale:
                    # Started before the latest deploy changed user_config: catch up.
                    self._background(self._reconfigure_slot(dep, slot))
                dep.router.wake()
        else:
            slot.failures += 1
            if slot.source is not None:
                self.discovery.kick(dep)  # has the name moved on? look it up again soon
            if slot.state is not ReplicaState.UNHEALTHY:
                slot.set_state(ReplicaState.UNHEALTHY, why)
                log.warning("replica %s is unhealthy: %s", slot.replica_id, why)
                self._emit("unhealthy", slot)
                dep.router.wake()

    async def _check(self, dep: DeploymentState, slot: ReplicaSlot) -> tuple[bool, str]:
        rep = slot.replica
        if rep is None:
            return False, "no address"
        stub = health_pb2_grpc.HealthStub(rep.channel)
        timeout = dep.config.health_check_timeout_s
        check = asyncio.ensure_future(
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout))
        try:
            # grpc's deadline alone is not enough: behind writes a stopped replica does not
            # read (large requests filling the connection's window), the check was seen to
            # end only after ~19 s, and the replica stayed in rotation all that time. The
            # second, short wait is for a loop that was itself stalled past the first: an
            # answer that came in time is only seen now, and must not count as none.
            for wait in (timeout + CHECK_GRACE_S, CHECK_GRACE_S):
                if (await asyncio.wait((check,), timeout=wait))[0]:
                    break
            else:
                return False, f"health check: no answer within {timeout:g}s"
            resp = check.result()
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                return True, ""  # an external server without the health service, but up
            return False, f"health check failed: {e.code().name}: {e.details()}"
        finally:
            check.cancel()  # given up (or this check was cancelled): the call goes too
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return False, f"health check: {status}"
        return True, ""

    async def _reflect(self, dep: DeploymentState, replica: Replica) -> None:
        """Learn the replica's methods (names and shapes) through server reflection."""
        try:
            files = await fetch_reflection(replica.channel)
            dep.reflection_empty = not files
            if not files:
                log.warning("%s", no_reflection_warning(
                    dep.app, dep.name, has_method_sources(self.config)))
            if files and self.on_descriptors is not None:
                self.on_descriptors(files, (dep.app, dep.name))
            if files and dep.config.is_local:
                dep.router.methods_known = True
        finally:
            dep.reflect_done = True

    def suspect(self, replica: Replica) -> None:
        """The proxy could not reach `replica`: stop routing to it and check it now."""
        for app in self.apps.values():
            dep = app.deployments.get(replica.deployment)
            if dep is None or app.name != replica.application:
                continue
            for slot in dep.slots:
                if slot.replica is replica:
                    self._set_health(dep, slot, False, "unreachable from the gateway")
                    slot.wake.set()

    async def _health_loop(self, dep: DeploymentState, slot: ReplicaSlot,
                           alive: Callable[[], bool]) -> None:
        """Check on a period until the slot stops or `alive()` turns false."""
        while not slot.stopping and alive():
            ok, why = await self._check(dep, slot)
            if slot.stopping or not alive():
                return
            self._set_health(dep, slot, ok, why)
            self._emit("checked", slot)  # the dashboard lists recent checks
            slot.wake.clear()
            period = dep.config.health_check_period_s
            if not ok:
                period = min(period, 0.5)  # come back quickly once it passes again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.wake.wait(), period)
