"""What is running and is it healthy: the status `gateway status` prints.

Shaped like Ray Serve's `serve status` / `serve.status()`: the proxies with their state, and per
application its status, message and last deployed time, and per deployment its status, replica
state counts and message. Built from the controller in the gateway, carried over the admin
service, and returned to scripts as dataclasses by `gateway.status(address)`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from gateway.dataplane.method_warnings import deployment_warning, has_method_sources
from gateway.pb import admin_pb2

if TYPE_CHECKING:
    from gateway.hooks import RunningGateway

DEFAULT_ADMIN_ADDRESS = "127.0.0.1:9001"


@dataclass
class ReplicaDetails:
    replica_id: str
    state: str
    message: str = ""
    pid: int = 0
    address: str = ""
    starts: int = 0
    multiplexed_models: list[str] | None = None
    """The multiplexed model ids it holds (sorted); None when it serves no multiplexed models."""


@dataclass
class DeploymentStatusOverview:
    status: str
    """UPDATING, HEALTHY or UNHEALTHY."""
    message: str = ""
    """Why it is not HEALTHY (for example the exception a replica's constructor raised)."""
    replica_states: dict[str, int] = field(default_factory=dict)
    """Replica state -> how many replicas are in it."""
    replicas: list[ReplicaDetails] = field(default_factory=list)
    warning: str = ""
    """Something that works but needs the operator (its replicas' methods are unknown)."""


@dataclass
class ApplicationStatusOverview:
    status: str
    """NOT_STARTED, DEPLOYING, RUNNING, DEPLOY_FAILED or UNHEALTHY."""
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)


@dataclass
class ProxyStatus:
    status: str
    """STARTING, HEALTHY, UNHEALTHY, DRAINING or DRAINED."""
    address: str = ""


@dataclass
class GatewayStatus:
    proxies: dict[str, ProxyStatus] = field(default_factory=dict)
    """Node id -> the gateway (proxy) running there."""
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)

    def to_dict(self, verbose: bool = False) -> dict[str, Any]:
        """Plain data in `serve status` layout; `verbose` adds addresses and replicas."""
        proxies: dict[str, Any] = {
            node: ({"status": p.status, "address": p.address} if verbose else p.status)
            for node, p in self.proxies.items()
        }
        apps: dict[str, Any] = {}
        for name, a in self.applications.items():
            deps: dict[str, Any] = {}
            for dname, d in a.deployments.items():
                entry: dict[str, Any] = {
                    "status": d.status,
                    "replica_states": dict(d.replica_states),
                    "message": d.message,
                }
                if d.warning:
                    entry["warning"] = d.warning
                if verbose:
                    entry["replicas"] = [
                        {"replica_id": r.replica_id, "state": r.state, "pid": r.pid,
                         "address": r.address, "starts": r.starts, "message": r.message,
                         **({} if r.multiplexed_models is None
                            else {"multiplexed_models": list(r.multiplexed_models)})}
                        for r in d.replicas
                    ]
                deps[dname] = entry
            apps[name] = {
                "status": a.status,
                "message": a.message,
                "last_deployed_time_s": a.last_deployed_time_s,
                "deployments": deps,
            }
        return {"proxies": proxies, "applications": apps}

    def to_yaml(self, verbose: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(verbose), sort_keys=False, width=100)


# -- building it in the gateway ----------------------------------------------------------


def node_id(gw: RunningGateway) -> str:
    """Identifies this gateway among several behind one load balancer."""
    return f"{socket.gethostname()}:{gw.port}"


def build_status(gw: RunningGateway) -> GatewayStatus:
    out = GatewayStatus(proxies={node_id(gw): ProxyStatus(gw.state, gw.address)})
    if gw.http_address is not None:
        out.proxies[f"{node_id(gw)}/http"] = ProxyStatus(gw.state, gw.http_address)
    for name, app in gw.controller.apps.items():
        deps: dict[str, DeploymentStatusOverview] = {}
        for dname, dep in app.deployments.items():
            deps[dname] = DeploymentStatusOverview(
                status=dep.status,
                message=dep.message,
                replica_states=dep.replica_states(),
                replicas=[
                    ReplicaDetails(
                        replica_id=s.replica_id,
                        state=s.state.value,
                        message=s.message,
                        pid=s.pid or 0,
                        address=s.replica.address if s.replica is not None else (s.target or ""),
                        starts=s.starts,
                        multiplexed_models=_models_of(s.replica),
                    )
                    for s in dep.slots
                ],
                warning=deployment_warning(dep.router, dep.reflection_empty,
                                           has_method_sources(gw.config)),
            )
        out.applications[name] = ApplicationStatusOverview(
            status=app.status,
            message=app.message,
            last_deployed_time_s=app.deployed_at,
            deployments=deps,
        )
    return out


def _models_of(replica: Any) -> list[str] | None:
    if replica is None or replica.mux_capacity is None:
        return None
    return sorted(replica.mux_models)


# -- over the wire -----------------------------------------------------------------------


def to_proto(status: GatewayStatus) -> admin_pb2.GetStatusResponse:
    msg = admin_pb2.GetStatusResponse()
    for node, p in status.proxies.items():
        msg.proxies.add(node_id=node, status=p.status, address=p.address)
    for name, a in status.applications.items():
        am = msg.applications.add(
            name=name, status=a.status, message=a.message,
            last_deployed_time_s=a.last_deployed_time_s,
        )
        for dname, d in a.deployments.items():
            dm = am.deployments.add(name=dname, status=d.status, message=d.message,
                                    warning=d.warning)
            dm.replica_states.update(d.replica_states)
            for r in d.replicas:
                dm.replicas.add(replica_id=r.replica_id, state=r.state, message=r.message,
                                pid=r.pid, address=r.address, starts=r.starts,
                                multiplexed=r.multiplexed_models is not None,
                                multiplexed_model_ids=r.multiplexed_models or ())
    return msg


def from_proto(msg: admin_pb2.GetStatusResponse) -> GatewayStatus:
    out = GatewayStatus()
    for p in msg.proxies:
        out.proxies[p.node_id] = ProxyStatus(p.status, p.address)
    for a in msg.applications:
        out.applications[a.name] = ApplicationStatusOverview(
            status=a.status,
            message=a.message,
            last_deployed_time_s=a.last_deployed_time_s,
            deployments={
                d.name: DeploymentStatusOverview(
                    status=d.status,
                    message=d.message,
                    replica_states=dict(d.replica_states),
                    replicas=[
                        ReplicaDetails(r.replica_id, r.state, r.message, r.pid, r.address,
                                       r.starts, list(r.multiplexed_model_ids)
                                       if r.multiplexed else None)
                        for r in d.replicas
                    ],
                    warning=d.warning,
                )
                for d in a.deployments
            },
        )
    return out
