"""The control plane: turns the goal state into running, health-checked replicas.

It starts local replica processes (restarting crashed ones with backoff), health-checks every
replica with `grpc.health.v1`, keeps replica / deployment / application states, and hands the
proxy one `Router` per application.

Layers (one module each): base, reconfigure, health, supervisor, and this one, which
reconciles the goal state: add, change, roll and remove applications and deployments.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from gateway.config import ApplicationConfig, DeploymentConfig, GatewayConfig
from gateway.control.discovery import Discovery
from gateway.control.state import (
    ApplicationState,
    ApplicationStatus,
    DeploymentState,
    DeploymentStatus,
    ReplicaEvent,
    ReplicaSlot,
)
from gateway.control.supervisor import STARTUP_TIMEOUT_S, Supervisor
from gateway.dataplane.replicas import ReplicaState

log = logging.getLogger("gateway.controller")


__all__ = [  # the states live in gateway/control/state.py; importers keep these names
    "ApplicationState", "ApplicationStatus", "Controller", "DeploymentState",
    "DeploymentStatus", "ReplicaEvent", "ReplicaSlot",
]


class Controller(Supervisor):
    """Reconciles the goal state; all methods run on the gateway's event loop."""

    def __init__(self, config: GatewayConfig, logs_dir: Path | None = None) -> None:
        super().__init__(config, logs_dir)
        self.discovery = Discovery(self._new_slot, self._stop_slot)

    # -- goal state ----------------------------------------------------------------------

    async def apply(self, config: GatewayConfig) -> list[str]:
        """Move towards `config`: add, change and remove applications and deployments.

        Returns what did not work (a failed reconfigure, a new model that did not come up);
        the controller keeps retrying those.
        """
        self.config = config
        problems: list[str] = []
        wanted = {a.name: a for a in config.applications}
        for name in [n for n in self.apps if n not in wanted]:
            await self._remove_app(name)
        for name, app_cfg in wanted.items():
            state = self.apps.get(name)
            if state is None:
                state = ApplicationState(app_cfg)
                self.apps[name] = state
            elif state.config != app_cfg:
                state.deployed_at = time.time()
            state.config = app_cfg
            problems += [f"{name}: {p}" for p in await self._apply_app(state, app_cfg)]
        self._routes_changed()
        return problems

    async def _apply_app(self, state: ApplicationState, cfg: ApplicationConfig) -> list[str]:
        problems: list[str] = []
        wanted = {d.name: d for d in cfg.deployments}
        for name in [n for n in state.deployments if n not in wanted]:
            await self._scale(state.deployments.pop(name), 0)
        for name, dcfg in wanted.items():
            dep: DeploymentState | None = state.deployments.get(name)
            if dep is None:
                dep = DeploymentState(cfg.name, dcfg, self.max_message_bytes)
                state.deployments[name] = dep
                self._start_slots(dep)
                continue
            if _revision_differs(dep, dcfg, self.discovery.names(dep)):
                problems += await self._roll(dep, dcfg)
                continue
            dep.rollout_error = ""  # the operator deployed what still serves: accepted
            user_config_changed = dcfg.user_config != dep.config.user_config
            dep.config = dcfg
            dep.router.max_ongoing = dcfg.max_ongoing_requests
            dep.router.max_queued = dcfg.max_queued_requests
            if dcfg.is_local:
                await self._scale(dep, dcfg.num_replicas)
                if user_config_changed:
                    problems += await self._reconfigure(dep)
            dep.router.wake()
        return problems

    def _start_slots(self, dep: DeploymentState) -> None:
        cfg = dep.config
        targets = Discovery.static_targets(cfg.targets) if cfg.targets is not None else None
        for target in targets if targets is not None else [None] * cfg.num_replicas:
            self._new_slot(dep, target)
        self.discovery.watch(dep)  # the dns:/// targets

    async def _scale(self, dep: DeploymentState, n: int) -> None:
        if n == 0:
            self.discovery.forget(dep)  # removed: no new discovered replicas either
        while len(dep.slots) < n:
            self._new_slot(dep)
        extra = dep.slots[n:]
        if not extra:
            return
        # Take them out of routing first, so no new call lands on a stopping replica.
        for slot in extra:
            slot.stopping = True
            slot.set_state(ReplicaState.STOPPING)
        dep.router.set_replicas(
            [s.replica for s in dep.slots[:n] if s.replica is not None]
        )
        await asyncio.gather(*(self._stop_slot(dep, s) for s in extra))
        dep.slots = dep.slots[:n]
        dep.publish()

    async def _roll(self, dep: DeploymentState, dcfg: DeploymentConfig) -> list[str]:
        """A different model: start a new replica, wait until it serves, then drain an old
        one, one at a time, so the deployment keeps serving throughout.

        Like a Kubernetes rolling update, the roll stops at the first new replica that does
        not become healthy: that one is stopped, the old replicas keep serving, and the
        deployment says DEPLOY_FAILED until a later deploy rolls (or accepts) a revision."""
        # Replicas already draining out of DNS leave by themselves (the discovery's drain).
        old = [s for s in dep.slots if not s.stopping]
        before = dep.config
        targets: list[tuple[str | None, str | None]] = [(None, None)] * dcfg.num_replicas
        if dcfg.targets is not None:
            found, errors = await self.discovery.expand(dcfg.targets)
            if errors:  # nothing to roll to: everything stays as it is
                dep.rollout_error = (f"rolling change to targets {dcfg.targets} not started: "
                                     f"{'; '.join(errors)}; {len(old)} previous replica(s) "
                                     "keep serving")
                log.error("deployment %s/%s: %s", dep.app, dep.name, dep.rollout_error)
                dep.note_health()
                return [f"{dep.name}: {dep.rollout_error}"]
            targets = list(found)
        dep.config = dcfg
        dep.rollout_error = ""
        dep.ever_healthy = False  # the new revision has not run yet
        dep.reflected = dep.reflect_done = False  # learn the new model's methods
        dep.router.max_ongoing = dcfg.max_ongoing_requests
        dep.router.max_queued = dcfg.max_queued_requests
        self.discovery.forget(dep)  # the roll decides the slots; watched again after it
        problems: list[str] = []
        wait_s = STARTUP_TIMEOUT_S + dcfg.health_check_period_s + dcfg.health_check_timeout_s
        try:
            for i in range(max(len(targets), len(old))):
                if i < len(targets):
                    slot = self._new_slot(dep, *targets[i])
                    if not await self._wait_serving(slot, wait_s):
                        if self._closing:
                            # Not the new model's fault: its replica is stopped with the rest.
                            log.info("deployment %s/%s: roll interrupted: the gateway is "
                                     "stopping", dep.app, dep.name)
                            return [f"{dep.name}: roll interrupted: the gateway is stopping"]
                        why = slot.message or "did not become healthy"
                        problems.append(f"{dep.name}: new replica {slot.replica_id}: {why}; "
                                        "roll stopped, the replicas running keep serving")
                        await self._stop_roll(dep, before, slot, why)
                        return problems
                if i < len(old):
                    victim = old[i]
                    victim.stopping = True
                    victim.set_state(ReplicaState.STOPPING)
                    if victim in dep.slots:  # (a drain may have taken it meanwhile)
                        dep.slots.remove(victim)
                    dep.publish()
                    await self._stop_slot(dep, victim)
        finally:
            # dep.config's names, and those of any slot the roll left (a stopped roll to a
            # name keeps the new replicas it started; they must still follow the name).
            self.discovery.watch(dep)
        dep.router.wake()
        return problems

    async def _stop_roll(self, dep: DeploymentState, before: DeploymentConfig,
                         failed: ReplicaSlot, why: str) -> None:
        """Give up a roll: drop the new replica that failed and go back to the revision
        the remaining replicas run (slots keep their own import_path for restarts)."""
        failed.stopping = True
        failed.set_state(ReplicaState.STOPPING)
        if failed in dep.slots:
            dep.slots.remove(failed)
        dep.publish()
        await self._stop_slot(dep, failed)
        new = dep.config
        what = new.import_path if new.is_local else f"targets {new.targets}"
        dep.config = before
        dep.router.max_ongoing = before.max_ongoing_requests
        dep.router.max_queued = before.max_queued_requests
        dep.rollout_error = (f"rolling change to {what} stopped: {why}; "
                             f"{len(dep.slots)} replica(s) running keep serving")
        dep.reflect_done = True  # the methods of the serving revision are still known
        log.error("deployment %s/%s: %s", dep.app, dep.name, dep.rollout_error)
        dep.note_health()
        dep.router.wake()

    async def _wait_serving(self, slot: ReplicaSlot, timeout: float) -> bool:
        """True once `slot` is RUNNING; False when it failed (or the wait timed out)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self._closing and not slot.stopping:
            if slot.state is ReplicaState.RUNNING:
                return True
            if slot.state is ReplicaState.UNHEALTHY and (slot.crashes or slot.failures):
                return False
            await asyncio.sleep(0.05)
        return False

    async def _remove_app(self, name: str) -> None:
        state = self.apps.pop(name)
        self._routes_changed()
        for dep in state.deployments.values():
            await self._scale(dep, 0)

    async def close(self) -> None:
        """Stop every replica (local processes get SIGTERM, then SIGKILL after their grace)."""
        self._closing = True
        await self.discovery.close()
        for app in list(self.apps.values()):
            for dep in app.deployments.values():
                for slot in dep.slots:
                    slot.stopping = True
        await asyncio.gather(
            *(
                self._stop_slot(dep, slot)
                for app in self.apps.values()
                for dep in app.deployments.values()
                for slot in dep.slots
            ),
            return_exceptions=True,
        )
        # Output still open after its replica exited belongs to a child the replica left.
        for pump in list(self._pumps):
            pump.cancel()

    # -- views ---------------------------------------------------------------------------

    def slots(self) -> list[tuple[DeploymentState, ReplicaSlot]]:
        return [
            (dep, slot)
            for app in self.apps.values()
            for dep in app.deployments.values()
            for slot in dep.slots
        ]

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every application is RUNNING (or failed); True when all run."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self._closing:
            statuses = [a.status for a in self.apps.values()]
            learned = all(
                d.reflect_done for a in self.apps.values() for d in a.deployments.values()
                if d.status == DeploymentStatus.HEALTHY and d.slots
            )
            if learned and all(s == ApplicationStatus.RUNNING for s in statuses):
                return True
            if any(s in (ApplicationStatus.DEPLOY_FAILED,) for s in statuses) and all(
                s != ApplicationStatus.DEPLOYING for s in statuses
            ):
                return False
            await asyncio.sleep(0.05)
        return False


def _revision_differs(dep: DeploymentState, dcfg: DeploymentConfig, watched: list[str]) -> bool:
    """Whether `dcfg` needs a roll: another model or targets than the replicas run."""
    if (dcfg.import_path != dep.config.import_path or dcfg.targets != dep.config.targets
            or dcfg.tls != dep.config.tls):  # new channels for new TLS settings
        return True
    if dcfg.targets is not None:
        running = [s.target or "" for s in dep.slots if s.source is None] + watched
        return sorted(running) != sorted(dcfg.targets)
    return any(s.import_path != dcfg.import_path for s in dep.slots)
