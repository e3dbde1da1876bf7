"""Logging of the gateway process: its handlers, its access log, its replicas' settings."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from gateway.logs.access import AccessLog, access_record
from gateway.logs.context import ContextFilter
from gateway.logs.escape import escape
from gateway.logs.format import file_handler, formatter
from gateway.logs.settings import (
    ACCESS,
    ENV_REPLICA_LOGGING,
    GATEWAY_LOG_FILE,
    TREES,
    LogSettings,
    replica_logging_config,
    resolve,
)

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.control.state import DeploymentState, ReplicaSlot
    from gateway.dataplane.call import CallRecord
    from gateway.hooks import RunningGateway


class GatewayLogging:
    """The gateway's log handlers, access log and replica-log plumbing.

    `start(gw)` attaches handlers to the `gateway` logger and the access log to the proxy's
    observers (when the config wants it); gateway/app.py hands the controller `replica_env` and
    `replica_output`. `stop()` flushes and detaches them, so tests can run gateways one after
    another.
    """

    def __init__(
        self,
        config: GatewayConfig,
        logs_dir: Path | None,
        console: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = dict(os.environ if env is None else env)  # read once, at start-up
        self.config = config
        self.settings = resolve(config.logging_config, logs_dir, self.env)
        self.logs_dir = Path(self.settings.logs_dir)
        self.console = console
        self.access: AccessLog | None = None
        self._handlers: list[logging.Handler] = []
        self._saved: dict[str, tuple[int, bool]] = {}
        self._gw: RunningGateway | None = None
        self._access_config = config
        self._access_levels: dict[tuple[str, str], int] = {}

    @property
    def log_file(self) -> Path:
        return self.logs_dir / GATEWAY_LOG_FILE

    def start(self, gw: RunningGateway) -> None:
        self._gw = gw
        flt = ContextFilter("gateway")
        fh = file_handler(self.log_file, self.settings)
        fh.addFilter(flt)
        self._handlers = [fh]
        if self.console:
            ch = logging.StreamHandler(sys.stderr)
            ch.setFormatter(formatter(self.settings.encoding))
            ch.addFilter(flt)
            self._handlers.append(ch)
        for name in TREES:
            tree = logging.getLogger(name)
            self._saved[name] = (tree.level, tree.propagate)
            for h in self._handlers:
                tree.addHandler(h)
            tree.setLevel(self.settings.log_level)
            if self.console:
                tree.propagate = False  # our console handler replaces the root logger's
        self.apply(gw.config)

    def stop(self) -> None:
        if self.access is not None:
            if self._gw is not None and self.access in self._gw.proxy.observers:
                self._gw.proxy.observers.remove(self.access)
            self.access.close()
            self.access = None
        for name, (level, propagate) in self._saved.items():
            tree = logging.getLogger(name)
            for h in self._handlers:
                tree.removeHandler(h)
            tree.setLevel(level)
            tree.propagate = propagate
        for h in self._handlers:
            h.close()
        self._handlers = []
        self._saved = {}

    def apply(self, config: GatewayConfig) -> None:
        """Follow a new config's access-log settings: an application's or deployment's
        `logging_config` (the narrower wins) also governs the gateway's access lines."""
        self._access_levels = {}
        self._access_config = config
        wanted = not self.settings.disable_access_log or any(
            not replica_logging_config(config, a.name, d.name).disable_access_log
            for a in config.applications for d in a.deployments)
        gw = self._gw
        if gw is None:
            return
        if wanted and self.access is None:
            self.access = AccessLog(logging.getLogger(ACCESS), self._call_record)
            gw.proxy.observers.append(self.access)
        elif not wanted and self.access is not None:
            if self.access in gw.proxy.observers:
                gw.proxy.observers.remove(self.access)
            self.access.close()
            self.access = None

    def _access_level(self, app: str, deployment: str) -> int:
        """Lowest level of an access line kept for this deployment (above CRITICAL: none)."""
        key = (app, deployment)
        level = self._access_levels.get(key)
        if level is None:
            merged = replica_logging_config(self._access_config, app, deployment)
            if merged.disable_access_log:
                level = logging.CRITICAL + 1
            else:
                level = logging.getLevelName(merged.log_level or self.settings.log_level)
            if len(self._access_levels) < 4096:  # names come from calls: keep it bounded
                self._access_levels[key] = level
        return level

    def _call_record(self, rec: CallRecord) -> logging.LogRecord | None:
        level = logging.INFO if rec.code is grpc.StatusCode.OK else logging.WARNING
        if level < self._access_level(rec.application, rec.deployment):
            return None
        return access_record(
            logging.getLogger(ACCESS), method=rec.method, code=rec.code,
            latency_s=rec.latency_s, end_time=rec.start_time + rec.latency_s,
            request_id=rec.request_id, application=rec.application,
            deployment=rec.deployment, replica=rec.replica,
        )

    def replica_settings(self, app: str, deployment: str) -> LogSettings:
        config = self._gw.controller.config if self._gw is not None else self.config
        merged = replica_logging_config(config, app, deployment)
        # The gateway's directory unless the application or deployment names its own.
        own_dir = merged.logs_dir if merged.logs_dir != config.logging_config.logs_dir else None
        settings = resolve(merged, own_dir or self.logs_dir, self.env)
        # Replicas stream to the console only when there is one (a foreground `gateway run`).
        return replace(settings, stream_replica_logs=settings.stream_replica_logs and self.console)

    def replica_env(self, dep: DeploymentState, slot: ReplicaSlot) -> dict[str, str]:
        """Environment for a replica process: its resolved logging settings."""
        return {ENV_REPLICA_LOGGING: self.replica_settings(dep.app, dep.name).to_json()}

    def replica_output(self, slot: ReplicaSlot, line: bytes) -> None:
        """A line a replica wrote to its stdout/stderr pipe.

        With console streaming on that is the replica's own log stream: shown prefixed with
        where it came from, as Ray does. Otherwise it is output that bypassed the replica's
        logging (a crash before logging was set up, a C extension): kept in the gateway log.
        """
        text = line.decode("utf-8", "replace").rstrip("\n")
        if not text:
            return
        if self.console and self.replica_settings(slot.application,
                                                  slot.deployment).stream_replica_logs:
            prefix = escape(f"(ServeReplica:{slot.application}#{slot.deployment} pid={slot.pid})")
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"{prefix} {escape(text)}\n")
                sys.stderr.flush()
            return
        logging.getLogger("gateway.replica_output").info(
            "%s", text,
            extra={"application": slot.application, "deployment": slot.deployment,
                   "replica": slot.replica_id},
        )
