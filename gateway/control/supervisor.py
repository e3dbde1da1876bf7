"""Replica processes: start them, watch them, restart crashed ones with backoff, stop them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway import event_loop
from gateway.control import process as replica_process
from gateway.control.auth import ENV_CONTROL_SECRET, new_secret
from gateway.control.health import HealthChecks
from gateway.control.process import read_report as _read_all
from gateway.control.process import restart_delay
from gateway.control.state import (
    DeploymentState,
    ReplicaSlot,
)
from gateway.control.tls_watch import ClientFilesWatch, close_when_idle
from gateway.dataplane.replicas import Replica, ReplicaState, replica_tag

log = logging.getLogger("gateway.controller")


STARTUP_TIMEOUT_S = 60.0
GATEWAY_ONLY_ENV = ("ARIZE_API_KEY", "ARIZE_SPACE_ID")
"""Secrets in the gateway's environment its replica processes do not inherit."""


class Supervisor(HealthChecks):
    """Runs one task per replica slot: a local process (restarted after a crash, with
    backoff) or an external target (health-checked only)."""

    def _new_slot(self, dep: DeploymentState, target: str | None = None,
                  source: str | None = None) -> ReplicaSlot:
        # A DNS-discovered replica is known by its address (its `replica` label).
        rid = target if source is not None and target else replica_tag(dep.app, dep.name)
        # Ids must be unique in a deployment (telemetry, status rows and the router key on
        # them); an address can be there twice for a moment (a roll keeping a name whose old
        # replica still drains), so the newcomer gets a suffix.
        taken = {s.replica_id for s in dep.slots}
        n = 2
        while rid in taken:
            rid = f"{target}#{n}"
            n += 1
        slot = ReplicaSlot(dep.app, dep.name, rid, target=target, source=source,
                           import_path=dep.config.import_path if target is None else None)
        dep.slots.append(slot)
        run = self._run_local(dep, slot) if target is None else self._run_external(dep, slot)
        slot.task = _supervised(run)
        return slot

    async def _run_external(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        assert slot.target is not None
        watch = ClientFilesWatch(dep.config.tls)
        slot.replica = Replica(dep.app, dep.name, slot.replica_id, slot.target,
                               dep.max_message_bytes, is_local=False, tls=dep.config.tls)
        slot.starts = 1
        self._emit("started", slot)
        dep.publish()
        try:
            while True:
                await self._health_loop(dep, slot, lambda: not watch.changed())
                if slot.stopping or slot.replica is None:
                    return
                # Its TLS files changed (or SIGHUP): a new channel reads them again.
                old = slot.replica
                slot.replica = Replica(dep.app, dep.name, slot.replica_id, slot.target,
                                       dep.max_message_bytes, is_local=False,
                                       tls=dep.config.tls)
                slot.replica.state, slot.replica.message = old.state, old.message
                dep.publish()
                log.info("replica %s: TLS files re-read, new channel", slot.replica_id)
                self._background(close_when_idle(old))
        except asyncio.CancelledError:
            pass

    async def _run_local(self, dep: DeploymentState, slot: ReplicaSlot) -> None:
        while not slot.stopping and not self._closing:
            slot.state = ReplicaState.STARTING if slot.starts == 0 else ReplicaState.RECOVERING
            slot.running_since = 0.0
            before = slot.process
            try:
                ok = await self._spawn(dep, slot)
            except asyncio.CancelledError:
                await self._kill(slot)
                raise
            except Exception as e:  # out of fds or processes: a failed start, tried again
                if slot.process is not before:  # (the one before was ended already)
                    await self._kill(slot)
                ok = False
                slot.set_state(ReplicaState.UNHEALTHY,
                               f"replica could not be started: {type(e).__name__}: {e}")
                log.error("replica %s: %s", slot.replica_id, slot.message)
                self._emit("unhealthy", slot)
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
        env = dict(os.environ)
        secret = new_secret()  # per process: the replica's control service wants it
        env.update(
            GATEWAY_APPLICATION=dep.app,
            GATEWAY_DEPLOYMENT=dep.name,
            GATEWAY_REPLICA_ID=slot.replica_id,
            PYTHONUNBUFFERED="1",
        )
        env.pop(ENV_CONTROL_SECRET, None)  # handed over on stdin: /proc/<pid>/environ shows env
        for var in GATEWAY_ONLY_ENV:  # the gateway's exporter keys: a model has no use for them
            env.pop(var, None)
        if event_loop.fork_env_set_here:  # for the gateway's own loop; a model forks as it likes
            env.pop(event_loop.FORK_ENV, None)
        if self.replica_env is not None:
            env.update(self.replica_env(dep, slot))
        cwd = os.getcwd()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")]))
        args = [
            sys.executable, "-m", "gateway.runtime.replica",
            "--import-path", import_path,
            "--max-message-bytes", str(dep.max_message_bytes),
            "--grace", str(cfg.graceful_shutdown_timeout_s),
            "--parent-pid", str(os.getpid()),
            "--stdin-control",
        ]
        control = secret.encode() + b"\n"
        if cfg.user_config is not None:  # on stdin after the secret: argv is public and short
            args.append("--user-config-stdin")
            control += json.dumps(cfg.user_config).encode() + b"\n"
        slot.user_config = cfg.user_config
        replica_process.check_fd_headroom()
        r, w = os.pipe()  # opened last: nothing above may leave it open
        args += ["--report-fd", str(w)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, pass_fds=(w,), env=env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                # Its own process group: the model's children can be ended with it
                # (replica_process.kill_group); the gateway's group signals no longer reach it.
                start_new_session=True,
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        # The secret (and user_config), a line each; the pipe then stays open as the
        # replica's lifeline: closing it (or this process dying) is what stops the replica
        # (replica_process.terminate).
        assert proc.stdin is not None
        try:
            proc.stdin.write(control)
        except (RuntimeError, OSError):
            pass  # it is gone already (uvloop has closed its pipe): it sends no report below
        slot.process = proc
        slot.starts += 1
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
            why = report.get("error", "no report")
            if why == replica_process.NO_REPORT and proc.returncode is not None:  # by itself
                code = proc.returncode
                why += f" (signal {-code})" if code < 0 else f" (exit code {code})"
            slot.set_state(ReplicaState.UNHEALTHY, f"replica failed to start: {why}")
            log.error("replica %s: %s", slot.replica_id, slot.message)
            self._emit("unhealthy", slot)
            return False
        slot.replica = Replica(dep.app, dep.name, slot.replica_id, f"127.0.0.1:{report['port']}",
                               dep.max_message_bytes, is_local=True,
                               mux=self.config.proxy.local_transport == "mux",
                               control_secret=secret)
        slot.replica.pid = proc.pid
        slot.replica.mux_capacity = report.get("multiplexed_capacity")  # runtime/multiplex.py
        self._emit("started", slot)
        dep.publish()
        return True

    async def _pump_output(self, slot: ReplicaSlot, stream: asyncio.StreamReader) -> None:
        # The replica writes its own log file (gateway/logs/replica.py); what reaches this pipe is
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
