"""The controller's shared state and hooks: the goal state it runs, the replica-event
listeners, the callbacks other parts set, and its background tasks.

The controller is built in layers, one job per module, each a subclass of the one before:
base (this) -> reconfigure (user_config pushes) -> health (checks, rotation) -> supervisor
(replica processes: spawn, restart with backoff, stop) -> controller (reconcile the goal state).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.control.discovery import Discovery
from gateway.control.state import (
    ApplicationState,
    DeploymentState,
    ReplicaEvent,
    ReplicaSlot,
)

log = logging.getLogger("gateway.controller")


class ControlBase:
    """State and hooks shared by every layer of the controller; all run on the event loop."""

    discovery: Discovery
    """The `dns:///` targets' lookups (made by the Controller, which can start slots)."""

    def __init__(self, config: GatewayConfig, logs_dir: Path | None = None) -> None:
        self.config = config
        self.apps: dict[str, ApplicationState] = {}
        self.logs_dir = logs_dir
        # Fixed at start like the proxy's own listener: a deploy cannot change it.
        self.max_message_bytes = config.proxy.max_message_bytes
        self.listeners: list[ReplicaEvent] = []
        self.on_routes_changed: Callable[[], None] | None = None
        self.on_descriptors: Callable[[list[Any], tuple[str, str]], None] | None = None
        """Receives the file descriptors replicas publish through reflection."""
        self.replica_output: Callable[[ReplicaSlot, bytes], None] | None = None
        """Receives each line a local replica prints (set by the logging setup)."""
        self.replica_env: Callable[[DeploymentState, ReplicaSlot], dict[str, str]] | None = None
        """Extra environment for a replica process (its logging settings; gateway/logs/)."""
        self._closing = False
        self._pumps: set[asyncio.Future[None]] = set()

    def _emit(self, event: str, slot: ReplicaSlot) -> None:
        for listener in self.listeners:
            try:
                listener(event, slot)
            except Exception:
                log.exception("replica listener failed")

    def _routes_changed(self) -> None:
        if self.on_routes_changed is not None:
            self.on_routes_changed()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
