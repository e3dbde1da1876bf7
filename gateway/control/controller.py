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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import ApplicationConfig, DeploymentConfig, GatewayConfig
from gateway.control import process as replica_process
from gateway.control.auth import ENV_CONTROL_SECRET, new_secret
from gateway.control.process import read_report as _read_all
from gateway.control.process import restart_delay
from gateway.control.state import (
    ApplicationState,
    ApplicationStatus,
    DeploymentState,
    DeploymentStatus,
    ReplicaEvent,
    ReplicaSlot,
)
from gateway.dataplane.methods import fetch_reflection
from gateway.dataplane.replicas import Replica, ReplicaState, replica_tag
from gateway.pb import replica_control_pb2, replica_control_pb2_grpc

__all__ = [  # the states moved to gateway/deployment_state.py; importers keep these names
    "ApplicationState", "ApplicationStatus", "Controller", "DeploymentState",
    "DeploymentStatus", "ReplicaEvent", "ReplicaSlot",
]

log = logging.getLogger("gateway.controller")

STARTUP_TIMEOUT_S = 60.0


class Controller:
    """Reconciles the goal state; all methods run on the gateway's event loop."""

    def __init__(self, config: GatewayConfig, logs_dir: Path | None = None) -> None:
        self.config = config
        self.apps: dict[str, ApplicationState] = {}
        self.logs_dir = logs_dir
        # Fixed at start like the proxy's own listener: a deploy cannot change it.
        self.max_message_bytes = config.proxy.max_message_bytes
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
            if _revision_differs(dep, dcfg):
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

    def _new_slot(self, dep: DeploymentState, target: str | None = None) -> ReplicaSlot:
        slot = ReplicaSlot(dep.app, dep.name, replica_tag(dep.app, dep.name), target=target,
                           import_path=dep.config.import_path if target is None else None)
        dep.slots.append(slot)
        run = self._run_local(dep, slot) if target is None else self._run_external(dep, slot)
        slot.task = _supervised(run)
        return slot

    def _start_slots(self, dep: DeploymentState) -> None:
        cfg = dep.config
        for target in cfg.targets if cfg.targets is not None else [None] * cfg.num_replicas:
            self._new_slot(dep, target)

    async def _scale(self, dep: DeploymentState, n: int) -> None:
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
        old = list(dep.slots)
        before = dep.config
        dep.config = dcfg
        dep.rollout_error = ""
        dep.ever_healthy = False  # the new revision has not run yet
        dep.reflected = dep.reflect_done = False  # learn the new model's methods
        dep.router.max_ongoing = dcfg.max_ongoing_requests
        dep.router.max_queued = dcfg.max_queued_requests
        targets: list[str | None] = (
            list(dcfg.targets) if dcfg.targets is not None else [None] * dcfg.num_replicas
        )
        problems: list[str] = []
        wait_s = STARTUP_TIMEOUT_S + dcfg.health_check_period_s + dcfg.health_check_timeout_s
        for i in range(max(len(targets), len(old))):
            if i < len(targets):
                slot = self._new_slot(dep, targets[i])
                if not await self._wait_serving(slot, wait_s):
                    if self._closing:
                        # Not the new model's fault: its replica is stopped with the rest.
                        log.info("deployment %s/%s: roll interrupted: the gateway is stopping",
                                 dep.app, dep.name)
                        return [f"{dep.name}: roll interrupted: the gateway is stopping"]
                    why = slot.message or "did not become healthy"
                    problems.append(f"{dep.name}: new replica {slot.replica_id}: {why}; "
                                    "roll stopped, the previous replicas keep serving")
                    await self._stop_roll(dep, before, slot, why)
                    return problems
            if i < len(old):
                victim = old[i]
                victim.stopping = True
                victim.set_state(ReplicaState.STOPPING)
                dep.slots.remove(victim)
                dep.publish()
                await self._stop_slot(dep, victim)
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
                             f"{len(dep.slots)} previous replica(s) keep serving")
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
        slot.healthy = True
        dep.note_health()
        self._emit("healthy", slot)
        dep.router.wake()

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
                slot.healthy = True
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
            if slot.state is not ReplicaState.UNHEALTHY:
                slot.set_state(ReplicaState.UNHEALTHY, why)
                slot.healthy = False
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
                               dep.max_message_bytes, is_local=False, tls=dep.config.tls)
        slot.starts = 1
        self._emit("started", slot)
        dep.publish()
        try:
            await self._health_loop(dep, slot, lambda: True)
        except asyncio.CancelledError:
            pass

    async def _run_local(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        while not slot.stopping and not self._closing:
            slot.state = ReplicaState.STARTING if slot.starts == 0 else ReplicaState.RECOVERING
            slot.running_since = 0.0
            try:
                ok = await self._spawn(dep, slot)
            except asyncio.CancelledError:
                await self._kill(slot)
                raise
            if ok:
                proc = slot.process
                assert proc is not None
                # Its exit, not the end of its pipes (a child of it may hold those open).
                watcher = asyncio.ensure_future(replica_process.wait_exit(proc, None))
                health = asyncio.ensure_future(
                    self._health_loop(dep, slot, _alive(proc))
                )
                try:
                    await asyncio.wait({watcher, health}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    health.cancel()
                    watcher.cancel()
                if slot.stopping or self._closing:
                    return
                await self._kill(slot)
                why = f"replica process exited with code {proc.returncode}"
                log.warning("replica %s: %s; restarting", slot.replica_id, why)
                self._set_health(dep, slot, False, why)
                slot.message = why
            if slot.replica is not None:
                old = slot.replica
                slot.replica = None
                dep.publish()
                await old.close()
            ran = time.monotonic() - slot.running_since if slot.running_since else 0.0
            if ran > replica_process.RESTART_RESET_AFTER_S:
                # It served a good while (its model's load time does not count): promptly.
                slot.crashes = 0
            slot.crashes += 1
            delay = restart_delay(slot.crashes)
            if slot.crashes > 1:
                # Say so in the status: a crash loop, and when the next attempt comes.
                slot.message = (f"{slot.message}; crash loop: {slot.crashes} failures in a "
                                f"row, next restart in {delay:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped(slot), delay)

    async def _stopped(self, slot: ReplicaSlot) -> None:
        while not slot.stopping and not self._closing:
            await asyncio.sleep(0.05)

    async def _spawn(self, dep: DeploymentState, slot: ReplicaSlot) -> bool:
        """Start the replica process; True once it listens, False (with a message) if not."""
        cfg = dep.config
        import_path = slot.import_path or cfg.import_path
        assert import_path is not None
        r, w = os.pipe()
        env = dict(os.environ)
        secret = new_secret()  # per process: the replica's control service wants it
        env.update(
            GATEWAY_APPLICATION=dep.app,
            GATEWAY_DEPLOYMENT=dep.name,
            GATEWAY_REPLICA_ID=slot.replica_id,
            PYTHONUNBUFFERED="1",
        )
        env.pop(ENV_CONTROL_SECRET, None)  # handed over on stdin: /proc/<pid>/environ shows env
        if self.replica_env is not None:
            env.update(self.replica_env(dep, slot))
        cwd = os.getcwd()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")]))
        args = [
            sys.executable, "-m", "gateway.runtime.replica",
            "--import-path", import_path,
            "--report-fd", str(w),
            "--max-message-bytes", str(dep.max_message_bytes),
            "--grace", str(cfg.graceful_shutdown_timeout_s),
            "--parent-pid", str(os.getpid()),
            "--stdin-control",
        ]
        if cfg.user_config is not None:
            args += ["--user-config", json.dumps(cfg.user_config)]
        slot.user_config = cfg.user_config
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, pass_fds=(w,), env=env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                # Its own process group: the model's children can be ended with it
                # (replica_process.kill_group); the gateway's group signals no longer reach it.
                start_new_session=True,
            )
        finally:
            os.close(w)
        # The secret, one line; the pipe then stays open as the replica's lifeline: closing
        # it (or this process dying) is what stops the replica (replica_process.terminate).
        assert proc.stdin is not None
        proc.stdin.write(secret.encode() + b"\n")
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
            await asyncio.wait({reader}, timeout=replica_process.KILL_WAIT_S)
            report = {"error": f"replica did not start within {STARTUP_TIMEOUT_S:.0f}s"}
        finally:
            if reader.done():
                os.close(r)
            else:
                reader.add_done_callback(lambda _: os.close(r))
        if "port" not in report and (slot.stopping or self._closing):
            await self._kill(slot)
            log.info("replica %s: stopped while starting", slot.replica_id)
            return False
        if "port" not in report:
            await self._kill(slot)
            slot.set_state(ReplicaState.UNHEALTHY,
                           f"replica failed to start: {report.get('error', 'no report')}")
            log.error("replica %s: %s", slot.replica_id, slot.message)
            self._emit("unhealthy", slot)
            return False
        slot.replica = Replica(dep.app, dep.name, slot.replica_id, f"127.0.0.1:{report['port']}",
                               dep.max_message_bytes, is_local=True,
                               mux=self.config.proxy.local_transport == "mux",
                               control_secret=secret)
        slot.replica.pid = proc.pid
        self._emit("started", slot)
        dep.publish()
        return True

    async def _pump_output(self, slot: ReplicaSlot, stream: asyncio.StreamReader) -> None:
        # The replica writes its own log file (gateway/logs.py); what reaches this pipe is
        # its console stream or output that bypassed its logging. Drained until it closes.
        def emit(line: bytes) -> None:
            if self.replica_output is not None:
                self.replica_output(slot, line)

        try:
            await replica_process.pump_output(stream, emit)
        except asyncio.CancelledError:
            pass
        finally:
            self._pumps.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _kill(self, slot: ReplicaSlot, grace: float = 5.0) -> None:
        await replica_process.terminate(slot.process, grace)

    async def _stop_slot(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        slot.stopping = True
        slot.set_state(ReplicaState.STOPPING)
        slot.wake.set()
        rep = slot.replica
        if rep is not None:
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


def _supervised(coro: Any) -> asyncio.Task[None]:
    """A replica task whose unexpected death is logged, not silently dropped."""
    task: asyncio.Task[None] = asyncio.ensure_future(coro)

    def report(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("replica task failed", exc_info=t.exception())

    task.add_done_callback(report)
    return task


def _revision_differs(dep: DeploymentState, dcfg: DeploymentConfig) -> bool:
    """Whether `dcfg` needs a roll: another model or targets than the replicas run."""
    if (dcfg.import_path != dep.config.import_path or dcfg.targets != dep.config.targets
            or dcfg.tls != dep.config.tls):  # new channels for new TLS settings
        return True
    if dcfg.targets is not None:
        return sorted(s.target or "" for s in dep.slots) != sorted(dcfg.targets)
    return any(s.import_path != dcfg.import_path for s in dep.slots)


def _alive(proc: asyncio.subprocess.Process) -> Callable[[], bool]:
    return lambda: proc.returncode is None

