"""The admin gRPC service (`gateway.admin.v1.GatewayAdmin`); its client is gateway/admin/client.py.

Behind `gateway status / config / deploy / shutdown`. It listens on loopback by default; since
`Deploy` and `Shutdown` change what runs, it can require `authorization: Bearer <token>`.
The token is never logged or echoed back.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import yaml

from gateway.admin.client import AdminAuthError, AdminClient, AdminError, AdminUnreachable
from gateway.admin.status import build_status, to_proto
from gateway.config import ConfigError, GatewayConfig, parse_config, unexpanded
from gateway.config_source import DeployError, unescape_refs
from gateway.hooks import ProxyState, RunningGateway
from gateway.pb import admin_pb2, admin_pb2_grpc
from gateway.tls import ServerTLS, listen

__all__ = [  # the client lived here before; importers keep these names
    "AdminAuthError", "AdminClient", "AdminError", "AdminServer", "AdminService",
    "AdminUnreachable",
]

log = logging.getLogger("gateway.admin")

SERVICE = "gateway.admin.v1.GatewayAdmin"
_LISTENER_SECTIONS = ("proxy", "http", "admin", "metrics", "dashboard")


# -- server ------------------------------------------------------------------------------


class _TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every admin call whose `authorization` is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        got = b""
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(got, self._expected):
            return await continuation(handler_call_details)
        why = "missing" if not got else "invalid"

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"admin token {why}: send metadata 'authorization: Bearer <token>'",
            )

        return grpc.unary_unary_rpc_method_handler(deny)


class AdminService(admin_pb2_grpc.GatewayAdminServicer):
    def __init__(self, gw: RunningGateway) -> None:
        self._gw = gw
        self._deploy_lock = asyncio.Lock()
        self._shutdown: asyncio.Task[None] | None = None

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: Any
    ) -> admin_pb2.GetStatusResponse:
        return to_proto(build_status(self._gw))

    async def GetConfig(
        self, request: admin_pb2.GetConfigRequest, context: Any
    ) -> admin_pb2.GetConfigResponse:
        text = yaml.safe_dump(self._gw.config.redacted(), sort_keys=False)
        return admin_pb2.GetConfigResponse(config_yaml=text)

    async def Deploy(
        self, request: admin_pb2.DeployRequest, context: Any
    ) -> admin_pb2.DeployResponse:
        gw = self._gw
        if gw.state in ProxyState.STOPPING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the gateway is {gw.state} and takes no new config")
        source = request.source or "<deploy>"
        try:
            data = yaml.safe_load(request.config_yaml)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{source}: invalid YAML{where}: {problem}")
        # `gateway deploy` expands ${VAR} in the operator's environment before sending; the
        # gateway takes what arrives literally (its own environment is not the operator's).
        left = unexpanded(data)
        if left is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{source}: {left}: holds a ${{VAR}} reference; `gateway "
                                "deploy` expands those in your environment before sending")
        data = unescape_refs(data)  # `$${`: a literal `${` in a value
        try:
            config = parse_config(data, source, expand=False)
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        async with self._deploy_lock:
            changed = [s for s in _LISTENER_SECTIONS
                         if getattr(config, s) != getattr(gw.config, s)]
            log.info("deploying a new config from %s: applications %s", source,
                     [a.name for a in config.applications])
            try:
                problems = await gw.apply(config)
            except DeployError as e:
                log.error("deploy refused: %s", e)  # its message quotes no config value
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:
                log.exception("deploy failed")
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"deploy failed: {type(e).__name__}: {e}")
        if problems:
            # The config is the goal state now, and the controller keeps retrying; but the
            # operator must hear that it does not run as asked.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "deployed, but not running as asked: " + "; ".join(problems))
        names = ", ".join(a.name for a in config.applications) or "none"
        msg = f"deployed; applications: {names}"
        if changed:
            msg += (f"; changes to {', '.join(changed)} take effect when the gateway "
                    "restarts")
        return admin_pb2.DeployResponse(message=msg)

    async def Shutdown(
        self, request: admin_pb2.ShutdownRequest, context: Any
    ) -> admin_pb2.ShutdownResponse:
        gw = self._gw
        grace = gw.config.proxy.graceful_shutdown_timeout_s
        ongoing = gw.proxy.ongoing
        if self._shutdown is None:
            log.info("shutdown requested through the admin service")
            # The admin server is the last thing the gateway stops, so this answer gets out.
            self._shutdown = asyncio.get_running_loop().create_task(self._gw.stop())
        return admin_pb2.ShutdownResponse(
            message=f"draining: {ongoing} call(s) in flight get up to {grace:g}s to finish"
        )

    async def LogActuals(
        self, request: admin_pb2.LogActualsRequest, context: Any
    ) -> admin_pb2.LogActualsResponse:
        # Off the loop: the first actuals may build an exporter (and import its SDK).
        accepted, rejected, message = await asyncio.to_thread(
            self._gw.records.log_actuals, request.application, list(request.actuals))
        return admin_pb2.LogActualsResponse(accepted=accepted, rejected=rejected,
                                            message=message)


class AdminServer:
    """The admin service on its own grpc.aio server (loopback by default)."""

    def __init__(self, gw: RunningGateway, config: GatewayConfig) -> None:
        self._gw = gw
        self._cfg = config.admin
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.tls: ServerTLS | None = None

    async def start(self) -> int:
        cfg = self._cfg
        # The token is fixed at start-up: a deploy cannot silently switch authentication off.
        token = cfg.token.get_secret_value() if cfg.token is not None else None
        interceptors = [_TokenInterceptor(token)] if token else []
        # No SO_REUSEPORT: a second gateway on this port must fail, not share its calls.
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        admin_pb2_grpc.add_GatewayAdminServicer_to_server(AdminService(self._gw), server)
        self.port, self.tls = listen(server, cfg.host, cfg.port, cfg.tls, "admin.tls",
                                     what="admin service")
        await server.start()
        self.server = server
        log.info("admin service listening on %s:%d%s", cfg.host, self.port,
                 " (TLS)" if cfg.tls else "")
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
