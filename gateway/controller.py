"""The control plane: turns the goal state into running, health-checked replicas.

It starts local replica processes (restarting crashed ones with backoff), health-checks every
replica with `grpc.health.v1`, keeps replica / deployment / application states, and hands the
proxy one `Router` per application.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import ApplicationConfig, DeploymentConfig, GatewayConfig
from gateway.methods import fetch_reflection
from gateway.pb import replica_control_pb2, replica_control_pb2_grpc
from gateway.replicas import Replica, ReplicaState, replica_tag
from gateway.router import Router

log = logging.getLogger("gateway.controller")

STARTUP_TIMEOUT_S = 60.0
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0


class DeploymentStatus:
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class ApplicationStatus:
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UNHEALTHY = "UNHEALTHY"


ReplicaEvent = Callable[[str, "ReplicaSlot"], None]
"""Hook for telemetry and logs: ('started' | 'healthy' | 'unhealthy' | 'stopped', slot)."""


@dataclass
class ReplicaSlot:
    """One replica position of a deployment; keeps its id across restarts of its process."""

    application: str
    deployment: str
    replica_id: str
    target: str | None = None
    """External address; None for a local replica."""
    replica: Replica | None = None
    process: asyncio.subprocess.Process | None = None
    state: ReplicaState = ReplicaState.STARTING
    message: str = ""
    starts: int = 0
    healthy: bool = False
    failures: int = 0
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    user_config: Any = None
    """The user_config this replica's process last received (at start or reconfigure)."""

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
        self.reflected = False
        self.reflect_done = False

    @property
    def name(self) -> str:
        return self.config.name

    def publish(self) -> None:
        """Give the router the current replica handles."""
        self.router.set_replicas([s.replica for s in self.slots if s.replica is not None])

    @property
    def status(self) -> str:
        slots = self.slots
        running = sum(1 for s in slots if s.state is ReplicaState.RUNNING)
        want = len(slots)
        if want and running == want:
            self.ever_healthy = True
            return DeploymentStatus.HEALTHY
        if want == 0:
            return DeploymentStatus.HEALTHY
        # A replica being restarted after a failure (its message says which) still counts as
        # unhealthy: otherwise the status flickers to UPDATING on every retry.
        if any(s.state is ReplicaState.UNHEALTHY
               or (s.state is ReplicaState.RECOVERING and s.message) for s in slots):
            return DeploymentStatus.UNHEALTHY
        return DeploymentStatus.UPDATING

    @property
    def message(self) -> str:
        msgs = sorted({s.message for s in self.slots if s.message})
        return "; ".join(msgs)

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
        if DeploymentStatus.UNHEALTHY in statuses:
            ever = all(d.ever_healthy for d in self.deployments.values())
            return ApplicationStatus.UNHEALTHY if ever else ApplicationStatus.DEPLOY_FAILED
        return ApplicationStatus.DEPLOYING

    @property
    def message(self) -> str:
        parts = [f"{d.name}: {d.message}" for d in self.deployments.values() if d.message]
        return "; ".join(parts)


class Controller:
    """Reconciles the goal state; all methods run on the gateway's event loop."""

    def __init__(self, config: GatewayConfig, logs_dir: Path | None = None) -> None:
        self.config = config
        self.apps: dict[str, ApplicationState] = {}
        self.logs_dir = logs_dir
        self.listeners: list[ReplicaEvent] = []
        self.on_routes_changed: Callable[[], None] | None = None
        self.on_descriptors: Callable[[list[Any]], None] | None = None
        """Receives the file descriptors replicas publish through reflection."""
        self.replica_output: Callable[[ReplicaSlot, bytes], None] | None = None
        """Receives each line a local replica prints (set by the logging setup)."""
        self.replica_env: Callable[[DeploymentState, ReplicaSlot], dict[str, str]] | None = None
        """Extra environment for a replica process (its logging settings; gateway/logs.py)."""
        self._closing = False
        self._pumps: set[asyncio.Future[None]] = set()

    # -- goal state ----------------------------------------------------------------------

    async def apply(self, config: GatewayConfig) -> None:
        """Move towards `config`: add, change and remove applications and deployments."""
        old = self.config
        self.config = config
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
            await self._apply_app(state, app_cfg, old)
        self._routes_changed()

    async def _apply_app(
        self, state: ApplicationState, cfg: ApplicationConfig, old: GatewayConfig
    ) -> None:
        wanted = {d.name: d for d in cfg.deployments}
        for name in [n for n in state.deployments if n not in wanted]:
            await self._scale(state.deployments.pop(name), 0)
        max_bytes = self.config.proxy.max_message_bytes
        for name, dcfg in wanted.items():
            dep: DeploymentState | None = state.deployments.get(name)
            if dep is not None and (
                dcfg.import_path != dep.config.import_path or dcfg.targets != dep.config.targets
            ):
                # A different model: replace every replica.
                await self._scale(dep, 0)
                state.deployments.pop(name)
                dep = None
            if dep is None:
                dep = DeploymentState(cfg.name, dcfg, max_bytes)
                state.deployments[name] = dep
                self._start_slots(dep)
                continue
            user_config_changed = dcfg.user_config != dep.config.user_config
            dep.config = dcfg
            dep.router.max_ongoing = dcfg.max_ongoing_requests
            dep.router.max_queued = dcfg.max_queued_requests
            if dcfg.is_local:
                await self._scale(dep, dcfg.num_replicas)
                if user_config_changed:
                    await self._reconfigure(dep)
            dep.router.wake()

    def _start_slots(self, dep: DeploymentState) -> None:
        cfg = dep.config
        if cfg.targets is not None:
            for target in cfg.targets:
                slot = ReplicaSlot(dep.app, cfg.name, replica_tag(dep.app, cfg.name), target=target)
                dep.slots.append(slot)
                slot.task = _supervised(self._run_external(dep, slot))
        else:
            for _ in range(cfg.num_replicas):
                self._add_local(dep)

    def _add_local(self, dep: DeploymentState) -> ReplicaSlot:
        slot = ReplicaSlot(dep.app, dep.name, replica_tag(dep.app, dep.name))
        dep.slots.append(slot)
        slot.task = _supervised(self._run_local(dep, slot))
        return slot

    async def _scale(self, dep: DeploymentState, n: int) -> None:
        while len(dep.slots) < n:
            self._add_local(dep)
        extra = dep.slots[n:]
        if not extra:
            return
        # Take them out of routing first, so no new call lands on a stopping replica.
        for slot in extra:
            slot.stopping = True
            slot.state = ReplicaState.STOPPING
        dep.router.set_replicas(
            [s.replica for s in dep.slots[:n] if s.replica is not None]
        )
        await asyncio.gather(*(self._stop_slot(dep, s) for s in extra))
        dep.slots = dep.slots[:n]
        dep.publish()

    async def _remove_app(self, name: str) -> None:
        state = self.apps.pop(name)
        self._routes_changed()
        for dep in state.deployments.values():
            await self._scale(dep, 0)

    async def _reconfigure(self, dep: DeploymentState) -> None:
        payload = json.dumps(dep.config.user_config)
        for slot in list(dep.slots):
            rep = slot.replica
            if rep is None or slot.state is not ReplicaState.RUNNING:
                continue  # one still starting is reconfigured once healthy (_set_health)
            if slot.user_config == dep.config.user_config:
                continue
            slot.state = ReplicaState.UPDATING
            self._emit("updating", slot)
            try:
                stub = replica_control_pb2_grpc.ReplicaControlStub(rep.channel)
                await stub.Reconfigure(
                    replica_control_pb2.ReconfigureRequest(user_config_json=payload), timeout=30
                )
                slot.message = ""
                slot.state = ReplicaState.RUNNING
                slot.user_config = dep.config.user_config
            except grpc.aio.AioRpcError as e:
                slot.message = f"reconfigure failed: {e.details()}"
                slot.state = ReplicaState.UNHEALTHY
            self._emit("healthy" if slot.state is ReplicaState.RUNNING else "unhealthy", slot)

    # -- replicas ------------------------------------------------------------------------

    def _emit(self, event: str, slot: ReplicaSlot) -> None:
        for listener in self.listeners:
            try:
                listener(event, slot)
            except Exception:
                log.exception("replica listener failed")

    def _routes_changed(self) -> None:
        if self.on_routes_changed is not None:
            self.on_routes_changed()

    def _set_health(self, dep: DeploymentState, slot: ReplicaSlot, ok: bool, why: str) -> None:
        if slot.stopping:
            return
        if ok:
            slot.failures = 0
            if slot.state is not ReplicaState.RUNNING and slot.state is not ReplicaState.UPDATING:
                slot.state = ReplicaState.RUNNING
                slot.message = ""
                slot.healthy = True
                if slot.replica is not None:
                    slot.replica.state = ReplicaState.RUNNING
                log.info("replica %s is healthy", slot.replica_id)
                if not dep.reflected and slot.replica is not None:
                    dep.reflected = True
                    self._background(self._reflect(dep, slot.replica))
                self._emit("healthy", slot)
                if slot.user_config != dep.config.user_config:
                    # Started before the latest deploy changed user_config: catch up.
                    self._background(self._reconfigure(dep))
                dep.router.wake()
        else:
            slot.failures += 1
            if slot.state is not ReplicaState.UNHEALTHY:
                slot.state = ReplicaState.UNHEALTHY
                slot.message = why
                slot.healthy = False
                if slot.replica is not None:
                    slot.replica.state = ReplicaState.UNHEALTHY
                log.warning("replica %s is unhealthy: %s", slot.replica_id, why)
                self._emit("unhealthy", slot)
                dep.router.wake()

    async def _check(self, dep: DeploymentState, slot: ReplicaSlot) -> tuple[bool, str]:
        rep = slot.replica
        if rep is None:
            return False, "no address"
        stub = health_pb2_grpc.HealthStub(rep.channel)
        try:
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=dep.config.health_check_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                return True, ""  # an external server without the health service, but up
            return False, f"health check failed: {e.code().name}: {e.details()}"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return False, f"health check: {status}"
        return True, ""

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)

    async def _reflect(self, dep: DeploymentState, replica: Replica) -> None:
        """Learn the replica's methods (names and shapes) through server reflection."""
        try:
            files = await fetch_reflection(replica.channel)
            if files and self.on_descriptors is not None:
                self.on_descriptors(files)
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
            slot.wake.clear()
            period = dep.config.health_check_period_s
            if not ok:
                period = min(period, 0.5)  # come back quickly once it passes again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.wake.wait(), period)

    async def _run_external(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        assert slot.target is not None
        slot.replica = Replica(dep.app, dep.name, slot.replica_id, slot.target,
                               dep.max_message_bytes, is_local=False)
        slot.starts = 1
        self._emit("started", slot)
        dep.publish()
        try:
            await self._health_loop(dep, slot, lambda: True)
        except asyncio.CancelledError:
            pass

    async def _run_local(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        backoff = BACKOFF_INITIAL_S
        while not slot.stopping and not self._closing:
            slot.state = ReplicaState.STARTING if slot.starts == 0 else ReplicaState.RECOVERING
            started = time.monotonic()
            try:
                ok = await self._spawn(dep, slot)
            except asyncio.CancelledError:
                await self._kill(slot)
                raise
            if ok:
                proc = slot.process
                assert proc is not None
                watcher = asyncio.ensure_future(proc.wait())
                health = asyncio.ensure_future(
                    self._health_loop(dep, slot, _alive(proc))
                )
                try:
                    await asyncio.wait({watcher, health}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    health.cancel()
                if slot.stopping or self._closing:
                    return
                await self._kill(slot)
                slot.message = f"replica process exited with code {proc.returncode}"
                log.warning("replica %s: %s; restarting", slot.replica_id, slot.message)
                self._set_health(dep, slot, False, slot.message)
            if slot.replica is not None:
                old = slot.replica
                slot.replica = None
                dep.publish()
                await old.close()
            if time.monotonic() - started > 30:
                backoff = BACKOFF_INITIAL_S  # it ran a good while: restart promptly
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped(slot), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _stopped(self, slot: ReplicaSlot) -> None:
        while not slot.stopping and not self._closing:
            await asyncio.sleep(0.05)

    async def _spawn(self, dep: DeploymentState, slot: ReplicaSlot) -> bool:
        """Start the replica process; True once it listens, False (with a message) if not."""
        cfg = dep.config
        assert cfg.import_path is not None
        r, w = os.pipe()
        env = dict(os.environ)
        env.update(
            GATEWAY_APPLICATION=dep.app,
            GATEWAY_DEPLOYMENT=dep.name,
            GATEWAY_REPLICA_ID=slot.replica_id,
            PYTHONUNBUFFERED="1",
        )
        if self.replica_env is not None:
            env.update(self.replica_env(dep, slot))
        cwd = os.getcwd()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")]))
        args = [
            sys.executable, "-m", "gateway.replica_runtime",
            "--import-path", cfg.import_path,
            "--report-fd", str(w),
            "--max-message-bytes", str(dep.max_message_bytes),
            "--grace", str(cfg.graceful_shutdown_timeout_s),
            "--parent-pid", str(os.getpid()),
        ]
        if cfg.user_config is not None:
            args += ["--user-config", json.dumps(cfg.user_config)]
        slot.user_config = cfg.user_config
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, pass_fds=(w,), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            os.close(w)
        slot.process = proc
        slot.starts += 1
        slot.healthy = False
        assert proc.stdout is not None
        self._pumps.add(asyncio.ensure_future(self._pump_output(slot, proc.stdout)))
        reader = asyncio.get_running_loop().run_in_executor(None, _read_all, r)
        try:
            report = await asyncio.wait_for(asyncio.shield(reader), STARTUP_TIMEOUT_S)
        except TimeoutError:
            await self._kill(slot)  # its end of the pipe closes, so the reader returns
            await reader
            report = {"error": f"replica did not start within {STARTUP_TIMEOUT_S:.0f}s"}
        finally:
            if reader.done():
                os.close(r)
            else:
                reader.add_done_callback(lambda _: os.close(r))
        if "port" not in report:
            await self._kill(slot)
            slot.message = f"replica failed to start: {report.get('error', 'no report')}"
            slot.state = ReplicaState.UNHEALTHY
            log.error("replica %s: %s", slot.replica_id, slot.message)
            self._emit("unhealthy", slot)
            return False
        slot.replica = Replica(dep.app, dep.name, slot.replica_id, f"127.0.0.1:{report['port']}",
                               dep.max_message_bytes, is_local=True,
                               mux=self.config.proxy.local_transport == "mux")
        slot.replica.pid = proc.pid
        self._emit("started", slot)
        dep.publish()
        return True

    async def _pump_output(self, slot: ReplicaSlot, stream: asyncio.StreamReader) -> None:
        # The replica writes its own log file (gateway/logs.py); what reaches this pipe is
        # its console stream or output that bypassed its logging.
        try:
            while True:
                line = await stream.readline()
                if not line:
                    return
                if self.replica_output is not None:
                    self.replica_output(slot, line)
        except (asyncio.CancelledError, ValueError):
            pass
        finally:
            self._pumps.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _kill(self, slot: ReplicaSlot, grace: float = 5.0) -> None:
        proc = slot.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace + 1)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _stop_slot(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        slot.stopping = True
        slot.state = ReplicaState.STOPPING
        slot.wake.set()
        rep = slot.replica
        if rep is not None:
            rep.state = ReplicaState.STOPPING
            # Let calls already on this replica finish before it goes.
            deadline = time.monotonic() + dep.config.graceful_shutdown_timeout_s
            while rep.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            # Close our streams first: an open mux stream would hold the replica's own
            # graceful stop for its whole grace period.
            await rep.close()
        await self._kill(slot, dep.config.graceful_shutdown_timeout_s)
        if slot.task is not None:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await slot.task
        if rep is not None:
            await rep.close()
        self._emit("stopped", slot)

    async def close(self) -> None:
        """Stop every replica (local processes get SIGTERM, then SIGKILL after their grace)."""
        self._closing = True
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
        while time.monotonic() < end:
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


def _supervised(coro: Any) -> asyncio.Task[None]:
    """A replica task whose unexpected death is logged, not silently dropped."""
    task: asyncio.Task[None] = asyncio.ensure_future(coro)

    def report(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("replica task failed", exc_info=t.exception())

    task.add_done_callback(report)
    return task


def _alive(proc: asyncio.subprocess.Process) -> Callable[[], bool]:
    return lambda: proc.returncode is None


def _read_all(fd: int) -> dict[str, Any]:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    if not chunks:
        return {"error": "replica process exited before it reported"}
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "unreadable report from replica process"}
    return data if isinstance(data, dict) else {"error": "bad report"}
