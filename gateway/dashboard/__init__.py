"""The web dashboard (the seed's Ray Dashboard, port 8265): pages and the JSON API behind them.

`Dashboard(gw, ...)` hooks a call counter to the proxy and a listener to the controller, adds
its bookkeeping to the control loop, and serves on `dashboard.host:port` once started.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import DashboardConfig
from gateway.control.loop import ControlLoop
from gateway.dashboard.api import DashboardApi, GatewayView, Scrubber
from gateway.dashboard.processes import ProcessTable
from gateway.dashboard.series import CallSeries
from gateway.dashboard.server import DashboardServer
from gateway.tls import scheme

__all__ = ["MAX_RECORD_CHARS", "Dashboard", "DashboardApi", "GatewayView", "Scrubber",
           "records_snapshot"]


class Dashboard:
    """Build before the controller starts anything (it must see every replica start)."""

    def __init__(
        self,
        gw: GatewayView,
        config: DashboardConfig,
        observers: list[Callable[[Any], None]],
        loop: ControlLoop,
        replica_log: Callable[[str, str, str], Path],
        gateway_log: Path,
        records: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.series = CallSeries()
        self.procs = ProcessTable(gateway_log, lambda rid: _log_of(gw, replica_log, rid))
        observers.append(self.series.observe)
        gw.controller.listeners.append(self.procs.on_replica_event)
        loop.add(self.procs.tick)
        loop.add(lambda: self.series.tick(lambda: [
            (d.app, d.name) for a in gw.controller.apps.values()
            for d in a.deployments.values()]))
        self.api = DashboardApi(gw, self.series, self.procs, replica_log, gateway_log, records)
        # Fixed at start, like the admin service's own token (a deploy changing it says it
        # takes effect on restart, for both).
        secret = gw.config.admin.token
        token = secret.get_secret_value() if secret is not None else None
        self.server = DashboardServer(self.api, config.host, config.port, token=lambda: token,
                                      tls_config=config.tls)
        self.port = 0

    async def start(self) -> int:
        self.port = await self.server.start()
        return self.port

    async def stop(self) -> None:
        await self.server.stop()

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"{scheme(self.server.tls)}://{host}:{self.port}"


def _log_of(gw: GatewayView, replica_log: Callable[[str, str, str], Path], rid: str) -> Path:
    app, _, rest = rid.partition("#")
    dep = rest.partition("#")[0]
    return replica_log(app, dep, rid)


def records_snapshot(pipeline: Any) -> dict[str, Any]:
    """The record pipeline's counters plus each exporter's last error and last records."""
    snap: dict[str, Any] = pipeline.snapshot()
    for name, entry in snap.get("exporters", {}).items():
        st = pipeline.stats.get(name)
        if st is None:
            continue
        entry["last_error"] = getattr(st, "last_error", "")
        entry["last_error_at"] = getattr(st, "last_error_at", 0.0) or None
        entry["recent"] = [_bounded(r.to_dict()) for r in list(getattr(st, "recent", ()))]
    return snap


MAX_RECORD_CHARS = 4000


def _bounded(record: dict[str, Any]) -> Any:
    """A record as shown: cut when large (a tensor's features), so the page stays light."""
    text = json.dumps(record, default=str)
    return record if len(text) <= MAX_RECORD_CHARS else text[:MAX_RECORD_CHARS] + "…"
