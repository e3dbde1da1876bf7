"""The controller's periodic loop, measured under Ray Serve's names.

Ray's controller runs one reconcile loop every 0.1 s and exports how long each took
(`ray_serve_controller_control_loop_duration_s`) and how many ran
(`ray_serve_controller_num_control_loops`), so Ray's Grafana panels plot the control plane's
health. The gateway's controller reconciles on events (a replica exits, a health check fails),
and does its periodic bookkeeping here: each step (noticing dead processes, closing the
dashboard's chart intervals, sampling memory) is a plain function run in turn on the event
loop; a slow step shows as a long loop, as in Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gateway.controller")

INTERVAL_S = 0.1
"""Ray's CONTROL_LOOP_INTERVAL_S."""


class ControlLoop:
    """`add(step)`, `start()`, `await stop()`; `register_metrics(provider)` to export."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.steps: list[Callable[[], None]] = []
        self.num_loops = 0
        self.last_duration_s = 0.0
        self.actor_id = secrets.token_hex(16)
        """Ray labels the loop count with the controller's actor id; this one is per process."""
        self._task: asyncio.Task[None] | None = None
        self._failed: set[str] = set()

    def add(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def run_once(self) -> None:
        t0 = time.perf_counter()
        for step in self.steps:
            try:
                step()
            except Exception:
                name = getattr(step, "__qualname__", repr(step))
                if name not in self._failed:  # once per step: a loop at 10 Hz would flood
                    self._failed.add(name)
                    log.exception("control loop step %s failed", name)
        self.last_duration_s = time.perf_counter() - t0
        self.num_loops += 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.run_once()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def register_metrics(self, provider: Any) -> None:
        """Ray's two controller gauges on an OpenTelemetry meter provider (read at collection;
        no unit, so the Prometheus reader keeps Ray's names as they are)."""
        from opentelemetry.metrics import Observation

        meter = provider.get_meter("grpc_gateway.controller", "0.1.0")
        meter.create_observable_gauge(
            "ray_serve_controller_control_loop_duration_s",
            [lambda _o: [Observation(self.last_duration_s, {})]],
            description="The duration of the last control loop, in seconds.")
        meter.create_observable_gauge(
            "ray_serve_controller_num_control_loops",
            [lambda _o: [Observation(self.num_loops, {"actor_id": self.actor_id})]],
            description="The number of times that the controller has started a control loop.")
