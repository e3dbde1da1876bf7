"""The JSON behind every page: Ray's ServeInstanceDetails shape, and the gateway's own views.

Every function here reads one snapshot of the gateway's state (on the event loop, no I/O) and
returns plain data; the pages only render what these return.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.control.controller import Controller
    from gateway.control.state import DeploymentState, ReplicaSlot
    from gateway.dashboard.processes import ProcessTable
    from gateway.dashboard.series import CallSeries

REDACTED = "**********"
_SECRET_KEY = re.compile(r"(?i)(secret|token|password|passwd|api[_-]?key|credential|auth)")


class GatewayView(Protocol):
    """What the dashboard reads from the running gateway (gateway/app.py's `Gateway`)."""

    config: GatewayConfig
    state: str
    started_at: float
    port: int
    admin_port: int
    metrics_port: int | None
    controller: Controller

    @property
    def address(self) -> str: ...

    @property
    def http_address(self) -> str | None:
        """The HTTP ingress's URL (https:// with `http.tls`); None when it is off."""
        ...


class Scrubber:
    """Replaces every secret value the config holds (admin token, Arize keys, OTLP headers)
    in a string: served text (an exporter's last error, a log line) never carries one."""

    def __init__(self, config: GatewayConfig) -> None:
        found: list[str] = []

        def walk(v: Any) -> None:
            if isinstance(v, SecretStr):
                s = v.get_secret_value()
                if len(s) >= 4:  # shorter ones would blank out ordinary words
                    found.append(s)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list | tuple):
                for x in v:
                    walk(x)

        walk(config.model_dump(mode="python"))
        self.secrets = sorted(set(found), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        return text

    def data(self, value: Any, key: str = "") -> Any:
        """Plain data with secrets out: SecretStr values, string values under keys that name
        a secret (`api_key`, `token`, ...: user_config may hold one), and known secret values
        inside strings."""
        if isinstance(value, SecretStr):
            return REDACTED
        if isinstance(value, dict):
            return {k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k)
                        and isinstance(v, str) and v != "" else
                        self.data(v, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        if isinstance(value, str):
            return self(value)
        return value


class DashboardApi:
    """Builds each answer of the JSON API."""

    def __init__(self, gw: GatewayView, series: CallSeries, procs: ProcessTable,
                 replica_log: Callable[[str, str, str], Path], gateway_log: Path,
                 records: Callable[[], dict[str, Any]] | None = None) -> None:
        self.gw = gw
        self.series = series
        self.procs = procs
        self.replica_log = replica_log
        self.gateway_log = gateway_log
        self.records = records
        self.node_id = socket.gethostname()
        self.prometheus_url = gw.config.dashboard.prometheus_url
        self._scrub: tuple[GatewayConfig, Scrubber] | None = None

    @property
    def scrub(self) -> Scrubber:
        cfg = self.gw.config
        if self._scrub is None or self._scrub[0] is not cfg:
            self._scrub = (cfg, Scrubber(cfg))  # a deploy may bring new secrets
        return self._scrub[1]

    # -- Ray's REST API: GET /api/serve/applications/ --------------------------------------

    def _actor(self, name: str, pid: int | None, log_file: str) -> dict[str, Any]:
        return {"node_id": self.node_id, "node_ip": self.gw.config.proxy.host,
                "actor_id": None, "actor_name": name, "worker_id": None, "pid": pid,
                "log_file_path": log_file}

    def replica_details(self, dep: DeploymentState, slot: ReplicaSlot) -> dict[str, Any]:
        rep = slot.replica
        local = slot.target is None
        proc = self.procs.by_replica(slot.replica_id) if local else None
        log_file = str(self.replica_log(dep.app, dep.name, slot.replica_id)) if local else ""
        return {
            **self._actor(f"SERVE_REPLICA::{slot.replica_id}", slot.pid, log_file),
            "replica_id": slot.replica_id,
            "state": slot.state.value,
            "start_time_s": self.procs.started_at.get(slot.replica_id),
            # The gateway's own fields (not in Ray's schema).
            "message": self.scrub(slot.message),
            "address": rep.address if rep is not None else (slot.target or ""),
            "external": not local,
            "starts": slot.starts,
            "restarts": max(0, slot.starts - 1),
            "in_flight": rep.in_flight if rep is not None else 0,
            "rss_bytes": proc.rss_bytes if proc is not None else None,
            "rss_minus_shared_bytes": proc.uss_bytes if proc is not None else None,
        }

    def deployment_details(self, dep: DeploymentState) -> dict[str, Any]:
        cfg = dep.config
        dcfg = self.scrub.data(cfg.model_dump(mode="python", exclude={"logging_config"}))
        return {
            "name": dep.name,
            "status": dep.status,
            "status_trigger": "CONFIG_UPDATE_COMPLETED" if dep.status == "HEALTHY" else
            "CONFIG_UPDATE_STARTED",
            "message": self.scrub(dep.message),
            "deployment_config": dcfg,
            "target_num_replicas": len(cfg.targets) if cfg.targets is not None
            else cfg.num_replicas,
            "required_resources": {},
            "replicas": [self.replica_details(dep, s) for s in dep.slots],
            # The gateway's own fields.
            "replica_states": dep.replica_states(),
            "queued": dep.router.queued,
        }

    def applications(self) -> dict[str, Any]:
        """ServeInstanceDetails, the answer of Ray's `GET /api/serve/applications/`."""
        gw = self.gw
        cfg = gw.config
        apps: dict[str, Any] = {}
        for name, app in list(gw.controller.apps.items()):
            acfg = app.config
            apps[name] = {
                "name": name,
                "route_prefix": getattr(acfg, "route_prefix", None),
                "docs_path": None,
                "status": app.status,
                "message": self.scrub(app.message),
                "last_deployed_time_s": app.deployed_at,
                "deployed_app_config": self.scrub.data(acfg.model_dump(mode="python")),
                "source": "DECLARATIVE",
                "deployments": {d.name: self.deployment_details(d)
                                for d in list(app.deployments.values())},
                # The gateway's own field: which deployment takes the application's calls.
                "ingress_deployment": acfg.ingress_deployment.name,
            }
        return {
            "controller_info": self._actor("SERVE_CONTROLLER_ACTOR", _pid(),
                                           str(self.gateway_log)),
            "proxy_location": "HeadOnly",
            "http_options": None,
            "grpc_options": {"host": cfg.proxy.host, "port": gw.port,
                             "request_timeout_s": cfg.proxy.request_timeout_s},
            "proxies": {self.node_id: {**self._actor("SERVE_PROXY_ACTOR", _pid(),
                                                     str(self.gateway_log)),
                                       "status": gw.state, "address": gw.address,
                                       "protocol": "gRPC"}},
            "deploy_mode": "MULTI_APP",
            "target_capacity": None,
            "applications": apps,
        }

    # -- the gateway's own views -------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        gw = self.gw
        cfg = gw.config
        prom = cfg.metrics.prometheus
        metrics = (f"http://{_url_host(prom.host)}:{gw.metrics_port}/metrics"
                   if gw.metrics_port else None)
        return {
            "state": gw.state,
            "started_at": gw.started_at,
            "now": time.time(),
            "addresses": {"grpc": gw.address,
                          "http": gw.http_address,
                          "admin": f"{cfg.admin.host}:{gw.admin_port}" if gw.admin_port
                          else None,
                          "metrics": metrics,
                          "prometheus": self.prometheus_url},
            "chart_step_s": self.series.step_s,
            "chart_window_s": self.series.window_s,
        }

    def deployment(self, app: str, name: str) -> dict[str, Any] | None:
        a = self.gw.controller.apps.get(app)
        d = a.deployments.get(name) if a is not None else None
        if a is None or d is None:
            return None
        return {"application": app, **self.deployment_details(d)}

    def _find(self, replica_id: str) -> tuple[DeploymentState, ReplicaSlot] | None:
        for dep, slot in self.gw.controller.slots():
            if slot.replica_id == replica_id:
                return dep, slot
        return None

    def replica(self, replica_id: str) -> dict[str, Any] | None:
        found = self._find(replica_id)
        events = [e.to_dict() for e in self.procs.recent(replica_id)]
        for e in events:
            e["message"] = self.scrub(e["message"])
        if found is None:
            if not events:
                return None
            return {"replica_id": replica_id, "state": "STOPPED", "events": events,
                    "application": replica_id.split("#")[0],
                    "deployment": ([*replica_id.split("#"), ""])[1]}
        dep, slot = found
        return {"application": dep.app, "deployment": dep.name,
                **self.replica_details(dep, slot), "events": events}

    def replica_log_path(self, replica_id: str) -> Path | None:
        found = self._find(replica_id)
        if found is not None:
            dep, slot = found
            return self.replica_log(dep.app, dep.name, slot.replica_id) \
                if slot.target is None else None
        for p in self.procs.all():  # a dead one still listed
            if p.kind == "replica" and p.name == replica_id:
                return Path(p.log_file)
        return None

    def timeseries(self, app: str, deployment: str = "") -> dict[str, Any]:
        return {"application": app, "deployment": deployment, "step_s": self.series.step_s,
                "window_s": self.series.window_s,
                "points": [p.to_dict() for p in self.series.points(app, deployment)]}

    def processes(self) -> dict[str, Any]:
        return {"now": time.time(), "processes": [p.to_dict() for p in self.procs.all()]}

    def records_view(self) -> dict[str, Any]:
        snap = self.records() if self.records is not None else {}
        return self.scrub.data(snap)  # type: ignore[no-any-return]


def _pid() -> int:
    import os

    return os.getpid()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
