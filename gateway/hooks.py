"""What observers and operator surfaces use of the running gateway, in one place.

A call goes listener -> router -> replica (gateway/dataplane), then its `CallRecord` goes to the
observers, which hand what they make to the exporters (exporters/). The parts that watch the
gateway (metrics, records, logs) and the ones that answer operators (admin service, status)
take a `RunningGateway`: they import this module, never gateway/app.py, which builds them.

Attach points, all wired in `gateway.app.Gateway.__init__` / `start`, in this order:
1. `proxy.observers` (each finished call, on the event loop; must not block or raise):
   metrics (`Telemetry.observe`), then prediction records (`RecordPipeline.observe`), then the
   access log (attached and detached by `GatewayLogging.apply` as the config turns it on/off).
2. `controller.listeners` (replica events, see `gateway.control.state.ReplicaEvent`): metrics.
3. `controller.replica_env` / `controller.replica_output` (a replica's environment and the
   lines it writes outside logging): logs.
4. `controller.on_routes_changed`, `on_descriptors`, `proxy.on_unreachable`: the gateway itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.config import GatewayConfig
from gateway.control.controller import Controller
from gateway.dataplane.proxy import Proxy


class ProxyState:
    """The gateway's own state, as `gateway status` shows it (Ray's proxy states)."""

    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"
    STOPPING = (DRAINING, DRAINED)
    """The states in which the gateway takes no new calls and no new config."""


class ActualsSink(Protocol):
    def log_actuals(self, application: str, actuals: Sequence[Any]) -> tuple[int, int, str]:
        """Queue ground truth for earlier predictions: (accepted, rejected, message)."""
        ...


class RunningGateway(Protocol):
    """The running gateway, as its observers and operator surfaces see it."""

    @property
    def config(self) -> GatewayConfig:
        """The config it runs (the last one deployed)."""
        ...

    @property
    def state(self) -> str:
        """A `ProxyState`: STARTING, HEALTHY, UNHEALTHY, DRAINING or DRAINED."""
        ...

    @property
    def address(self) -> str:
        """Where the gRPC listener is bound."""
        ...

    @property
    def port(self) -> int: ...

    @property
    def http_address(self) -> str | None:
        """Where the HTTP ingress is bound; None when it is off."""
        ...

    @property
    def proxy(self) -> Proxy: ...

    @property
    def controller(self) -> Controller: ...

    @property
    def records(self) -> ActualsSink: ...

    async def apply(self, config: GatewayConfig) -> list[str]:
        """Deploy `config`; returns what does not run as asked."""
        ...

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop."""
        ...
