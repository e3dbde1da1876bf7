"""The states the controller keeps: per replica slot, deployment and application.

Statuses follow Ray Serve's names; `gateway status` shows them (gateway/admin/status.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ApplicationConfig, DeploymentConfig
from gateway.dataplane.replicas import Replica, ReplicaState
from gateway.dataplane.router import Router


class DeploymentStatus:
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    """A rolling change stopped at a new replica that did not come up; the previous
    revision's replicas still serve (`message` says which change failed and why)."""


class ApplicationStatus:
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UNHEALTHY = "UNHEALTHY"


ReplicaEvent = Callable[[str, "ReplicaSlot"], None]
"""Hook for telemetry, logs and the dashboard: ('started' | 'updating' | 'healthy' |
'unhealthy' | 'checked' (after each health check) | 'stopped', slot); 'updating': a new
user_config is being pushed (it keeps serving)."""


@dataclass
class ReplicaSlot:
    """One replica position of a deployment; keeps its id across restarts of its process."""

    application: str
    deployment: str
    replica_id: str
    target: str | None = None
    """External address; None for a local replica."""
    source: str | None = None
    """The `dns:///` target that found this address (gateway/control/discovery.py)."""
    import_path: str | None = None
    """The model this slot runs (restarts keep it, even while a roll is stopped half-way)."""
    replica: Replica | None = None
    process: asyncio.subprocess.Process | None = None
    state: ReplicaState = ReplicaState.STARTING
    message: str = ""
    starts: int = 0
    failures: int = 0
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    user_config: Any = None
    """The user_config this replica's process last received (at start or reconfigure)."""
    running_since: float = 0.0
    """When this process last became healthy (monotonic; 0 while it has not)."""
    crashes: int = 0
    """Failed starts and exits in a row (the restart back-off grows with it)."""
    reconfigure_failures: int = 0
    """Failed reconfigures in a row; while > 0 the replica stays out of rotation."""
    reconfigure_retry_at: float = 0.0
    reconfiguring: bool = False

    def set_state(self, state: ReplicaState, message: str | None = None) -> None:
        """The slot's and its replica's state together: the router reads the replica's."""
        self.state = state
        if message is not None:
            self.message = message
        if self.replica is not None:
            self.replica.state = state

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class DeploymentState:
    def __init__(self, app: str, config: DeploymentConfig, max_message_bytes: int) -> None:
        self.app = app
        self.config = config
        self.max_message_bytes = max_message_bytes
        self.router = Router(app, config.name, config.max_ongoing_requests,
                             config.max_queued_requests)
        self.slots: list[ReplicaSlot] = []
        self.ever_healthy = False
        self.rollout_error = ""
        """Why the last rolling change was stopped; cleared by the next deploy of it."""
        self.reflected = False
        self.reflect_done = False
        self.discovery_pending = False
        """A `dns:///` target of it has not been resolved yet (gateway/control/discovery.py)."""
        self.discovery_error = ""
        """Why the last lookup of a `dns:///` target failed ("" when it worked)."""
        self.reflection_empty = False
        """Reflection answered nothing: the replicas' methods may be unknown (see status)."""

    @property
    def name(self) -> str:
        return self.config.name

    def note_health(self) -> None:
        """Remember that every replica ran at once (a later failure is UNHEALTHY, not
        DEPLOY_FAILED); set when it happens, not when someone reads the status."""
        if self.slots and all(s.state is ReplicaState.RUNNING for s in self.slots):
            self.ever_healthy = True

    def publish(self) -> None:
        """Give the router the current replica handles."""
        self.router.set_replicas([s.replica for s in self.slots if s.replica is not None])

    @property
    def status(self) -> str:
        if self.rollout_error:
            return DeploymentStatus.DEPLOY_FAILED
        slots = self.slots
        running = sum(1 for s in slots if s.state is ReplicaState.RUNNING)
        want = len(slots)
        if want and running == want:
            return DeploymentStatus.HEALTHY
        if want == 0:
            # A DNS name not resolved yet, or resolved to nothing usable: nothing serves.
            if self.discovery_pending:
                return DeploymentStatus.UPDATING
            return DeploymentStatus.UNHEALTHY if self.discovery_error else DeploymentStatus.HEALTHY
        # A replica being restarted after a failure (its message says which) still counts as
        # unhealthy: otherwise the status flickers to UPDATING on every retry.
        if any(s.state is ReplicaState.UNHEALTHY
               or (s.state is ReplicaState.RECOVERING and s.message) for s in slots):
            return DeploymentStatus.UNHEALTHY
        return DeploymentStatus.UPDATING

    @property
    def message(self) -> str:
        msgs = sorted({s.message for s in self.slots if s.message})
        head = [m for m in (self.rollout_error, self.discovery_error) if m]
        return "; ".join(head + msgs)

    def replica_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.slots:
            counts[s.state.value] = counts.get(s.state.value, 0) + 1
        return counts


class ApplicationState:
    def __init__(self, config: ApplicationConfig) -> None:
        self.config = config
        self.deployments: dict[str, DeploymentState] = {}
        self.deployed_at = time.time()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ingress(self) -> DeploymentState:
        return self.deployments[self.config.ingress_deployment.name]

    @property
    def status(self) -> str:
        statuses = [d.status for d in self.deployments.values()]
        if not statuses:
            return ApplicationStatus.NOT_STARTED
        if all(s == DeploymentStatus.HEALTHY for s in statuses):
            return ApplicationStatus.RUNNING
        if DeploymentStatus.DEPLOY_FAILED in statuses:
            return ApplicationStatus.DEPLOY_FAILED
        if DeploymentStatus.UNHEALTHY in statuses:
            ever = all(d.ever_healthy for d in self.deployments.values())
            return ApplicationStatus.UNHEALTHY if ever else ApplicationStatus.DEPLOY_FAILED
        return ApplicationStatus.DEPLOYING

    @property
    def message(self) -> str:
        parts = [f"{d.name}: {d.message}" for d in self.deployments.values() if d.message]
        return "; ".join(parts)
