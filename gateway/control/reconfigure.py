"""Pushing a changed `user_config` to running replicas, with backoff when a replica refuses it."""

from __future__ import annotations

import json
import logging
import time

import grpc

from gateway.control.base import ControlBase
from gateway.control.process import restart_delay
from gateway.control.state import (
    DeploymentState,
    ReplicaSlot,
)
from gateway.dataplane.replicas import ReplicaState
from gateway.pb import replica_control_pb2, replica_control_pb2_grpc

log = logging.getLogger("gateway.controller")


class Reconfigurer(ControlBase):
    """Sends a deployment's new user_config to its replicas (`Reconfigure` over the control
    service); a replica that refuses it leaves rotation until a retry succeeds."""

    async def _reconfigure(self, dep: DeploymentState) -> list[str]:
        """Send the new user_config to every replica that has not got it; the failures."""
        problems = []
        for slot in list(dep.slots):
            if slot.replica is None or slot.state not in (ReplicaState.RUNNING,
                                                          ReplicaState.UNHEALTHY):
                continue  # one still starting is reconfigured once healthy (_set_health)
            why = await self._reconfigure_slot(dep, slot)
            if why:
                problems.append(f"{dep.name}: replica {slot.replica_id}: {why}")
        return problems

    async def _reconfigure_slot(self, dep: DeploymentState, slot: ReplicaSlot) -> str:
        want = dep.config.user_config
        rep = slot.replica
        if rep is None or slot.stopping or slot.reconfiguring:
            return ""
        if slot.user_config == want:
            if slot.reconfigure_failures:
                # The config it still runs is wanted again (a revert after a failed
                # reconfigure): nothing to send, and nothing keeps it out of rotation.
                slot.reconfigure_failures = 0
                slot.reconfigure_retry_at = 0.0
                if slot.failures == 0 and slot.state is ReplicaState.UNHEALTHY:
                    self._back_in_rotation(dep, slot)
                slot.wake.set()  # a health check now confirms it either way
            return ""
        slot.reconfiguring = True
        slot.state = ReplicaState.UPDATING  # its replica keeps serving meanwhile
        self._emit("updating", slot)
        try:
            stub = replica_control_pb2_grpc.ReplicaControlStub(rep.channel)
            await stub.Reconfigure(replica_control_pb2.ReconfigureRequest(
                user_config_json=json.dumps(want)), timeout=30)
        except grpc.aio.AioRpcError as e:
            why = e.details() or e.code().name
            if not why.startswith("reconfigure failed"):  # the replica's own words say so
                why = f"reconfigure failed: {e.code().name}: {why}"
            slot.reconfigure_failures += 1
            delay = restart_delay(slot.reconfigure_failures)
            slot.reconfigure_retry_at = time.monotonic() + delay
            if not slot.stopping:
                # Out of rotation: it would answer with a config the operator replaced.
                slot.set_state(ReplicaState.UNHEALTHY, f"{why}; retrying in {delay:g}s")
                log.warning("replica %s: %s", slot.replica_id, slot.message)
                self._emit("unhealthy", slot)
            return why
        finally:
            slot.reconfiguring = False
        slot.user_config = want
        slot.reconfigure_failures = 0
        if not slot.stopping:
            # Whatever a health check said while it was busy, it answered: back in rotation.
            self._back_in_rotation(dep, slot)
        return ""

    def _back_in_rotation(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        slot.set_state(ReplicaState.RUNNING, "")
        dep.note_health()
        self._emit("healthy", slot)
        dep.router.wake()
