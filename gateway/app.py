"""The gateway process: listener, controller and the services the gateway answers itself."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.admin.service import AdminServer
from gateway.config import GatewayConfig
from gateway.config_source import DeployError
from gateway.control.controller import Controller
from gateway.control.loop import ControlLoop
from gateway.dataplane.listen_address import grpc_address
from gateway.dataplane.method_sources import MethodSourceError, load_method_sources
from gateway.dataplane.methods import BUILTIN_PROTO_MODULES, MethodTable
from gateway.dataplane.oip_model_id import model_id_from_oip
from gateway.dataplane.proxy import AppRoute, Proxy
from gateway.dataplane.replicas import channel_options
from gateway.hooks import ProxyState
from gateway.ingress.http import HttpIngress
from gateway.logs import grpc_noise, write_errors
from gateway.logs.gateway_process import GatewayLogging
from gateway.metrics.exporter import SCOPE
from gateway.metrics.http import HttpMetrics
from gateway.metrics.telemetry import Telemetry
from gateway.pb import ray_serve_pb2, ray_serve_pb2_grpc
from gateway.records.pipeline import RecordPipeline
from gateway.tls import ServerTLS, config_problems, listen

log = logging.getLogger("gateway.server")

QUIET_S = 0.1
"""At the end of a drain, refused calls are held until none has come for this long..."""
QUIET_MAX_S = 1.0
"""...or for this long at most, before the listener shuts (Gateway._shut_listener)."""
QUIET_STEP_S = 0.001
STALL_S = 0.008
"""A quiet-wait step that overran by more than this found the loop busy: not quiet. More
than the GIL's 5 ms switch interval (what a busy thread of the gateway's costs a step); the
steps are short, so a stall longer than this is seen whenever it falls."""
HELD_ANSWER_S = 0.5
"""grpc's stop waits the rest of the grace (answers being sent to slow readers), and at least
this long, for the held refusals to be written, before it cancels what is left."""


class _Health(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpc's health service, whose Watch streams end once the drain shuts the listener (after
    they said NOT_SERVING): they never end by themselves, and grpc's stop would wait the rest
    of the grace for them."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = asyncio.Event()

    async def Watch(self, request: Any, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self.ending.wait())
        try:
            await asyncio.wait({watch, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            ending.cancel()


class RayServeAPI(ray_serve_pb2_grpc.RayServeAPIServiceServicer):
    """Ray Serve's own API, so Ray tooling and probes keep working."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def ListApplications(
        self, request: ray_serve_pb2.ListApplicationsRequest, context: Any
    ) -> ray_serve_pb2.ListApplicationsResponse:
        return ray_serve_pb2.ListApplicationsResponse(
            application_names=list(self._gw.controller.apps)
        )

    async def Healthz(
        self, request: ray_serve_pb2.HealthzRequest, context: Any
    ) -> ray_serve_pb2.HealthzResponse:
        if self._gw.state in ProxyState.STOPPING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "This node is being drained.")
        return ray_serve_pb2.HealthzResponse(message="success")


class Gateway:
    """`start()`, `stop()`, or `async with Gateway(config) as gw:`."""

    def __init__(
        self, config: GatewayConfig, logs_dir: Path | None = None, console_logs: bool = False
    ) -> None:
        self.config = config
        self.logs_dir = logs_dir
        self.state = ProxyState.STARTING
        self.started_at = time.time()
        self._drain_end = 0.0
        """When the drain's grace ends (monotonic clock)."""
        self.methods = MethodTable([*BUILTIN_PROTO_MODULES, *config.proto_modules])
        self.proxy = Proxy(
            self.methods,
            retries=config.proxy.retries,
            request_timeout_s=config.proxy.request_timeout_s,
        )
        self.controller = Controller(config, logs_dir=logs_dir)
        self.controller.on_routes_changed = self._publish_routes
        self.proxy.on_unreachable = self.controller.suspect
        self.controller.on_descriptors = self._learn_methods
        import importlib

        self._method_modules = [importlib.import_module(n) for n in config.proto_modules]
        self._source_files: list[Any] = []
        """What the config's proto_files and descriptor_sets hold (replaced by each deploy)."""
        self._published: dict[tuple[str, str], list[Any]] = {}
        """What each deployment's replicas publish through reflection (latest answer)."""
        self.telemetry = Telemetry(config.metrics, self) if config.metrics.enabled else None
        """None when metrics are disabled: then nothing at all is recorded."""
        self.records = RecordPipeline(
            config, logs_dir or Path(config.logging_config.logs_dir or "logs"), self.methods)
        if self.telemetry is not None:
            write_errors.register_metrics(self.telemetry.provider)
        """Prediction records: sampled calls decoded off the call path, sent to exporters."""
        self.logging = GatewayLogging(config, logs_dir, console=console_logs)
        """Log files, access log and replica logs (gateway/logs/)."""
        # Every observer is attached here, before the controller starts anything (so every
        # replica event is seen), in the order gateway/hooks.py lists: metrics, records, then
        # the access log, which GatewayLogging.apply adds or removes as the config asks.
        if self.telemetry is not None:
            self.proxy.observers.append(self.telemetry.observe)
            self.controller.listeners.append(self.telemetry.on_replica_event)
            self.records.register_metrics(self.telemetry.provider)
        self.proxy.observers.append(self.records.observe)
        self.controller.replica_env = self.logging.replica_env
        self.controller.replica_output = self.logging.replica_output
        self.http = self._http_ingress(config)
        """The HTTP ingress (OIP REST, JSON transcoding), when `http.enabled`."""
        self.metrics_port: int | None = None
        """Bound port of the Prometheus endpoint (None when it is off)."""
        self.health = _Health()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._stopped = asyncio.Event()
        grpc_noise.install()  # a client's non-UTF-8 metadata must not flood the logs
        self.admin = AdminServer(self, config)
        self.admin_port = 0
        """Bound port of the admin service (`gateway status/config/deploy/shutdown`)."""
        self.control_loop = ControlLoop()
        """The controller's periodic bookkeeping, measured under Ray's names."""
        if self.telemetry is not None:
            self.control_loop.register_metrics(self.telemetry.provider)
        self.dashboard = _dashboard(self) if config.dashboard.enabled else None
        self._stopping: asyncio.Future[None] | None = None
        self._host = config.proxy.host
        self.tls: ServerTLS | None = None
        """The gRPC listener's certificates (re-read on change; gateway/tls.py)."""

    @property
    def address(self) -> str:
        # The listener bound at start: a deploy changing proxy.host takes effect on restart.
        return grpc_address(self._host, self.port)

    @property
    def http_address(self) -> str | None:
        return self.http.address if self.http is not None else None

    def _http_ingress(self, config: GatewayConfig) -> HttpIngress | None:
        if not config.http.enabled:
            return None
        metrics = None
        t = self.telemetry
        if t is not None:
            metrics = HttpMetrics(config.metrics.latency_buckets_ms, t.node_id, config.http.host)
            metrics.register(t.provider.get_meter(SCOPE.name, SCOPE.version))
            t.extra_sources.append(metrics.histograms)
        ingress = HttpIngress(self.proxy, self.methods, config, metrics,
                              lambda: self.state == ProxyState.HEALTHY)
        if t is not None:
            t.gauges.http_calls_ongoing = lambda: ingress.in_proxy
        return ingress

    def _learn_methods(self, files: list[Any], source: tuple[str, str] | None = None) -> None:
        """`files` from a deployment's replicas (`source`), or the config's sources (None):
        the method table and the decoder are rebuilt from built-ins + the config's current
        sources + what replicas publish, so what a deploy removed is forgotten."""
        if source is None:
            self._source_files = list(files)
        else:
            self._published[source] = list(files)
        current = [*self._source_files, *(f for fs in self._published.values() for f in fs)]
        self.methods.rebuild(self._method_modules, current)
        self.records.learn_files(current)
        self.proxy.methods_learned()

    def _publish_routes(self) -> None:
        routes = {
            name: AppRoute(name, app.ingress.router) for name, app in self.controller.apps.items()
        }
        for name, app in self.controller.apps.items():
            if app.config.multiplexed_model_id_from == "oip_model_name":
                routes[name].model_id_of = model_id_from_oip
        self.records.bind_routes(routes)
        self.proxy.set_routes(routes)

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Start everything; if any part fails (a port in use), stop what did start."""
        try:
            await self._start(ready_timeout)
        except asyncio.CancelledError:
            # Asked to stop while starting (SIGTERM): drain what did start, with the grace.
            await self.stop()
            raise
        except BaseException:
            # A grpc.aio server left behind is freed after its loop has closed, and grpc's
            # shutdown then hangs joining its poller thread (seen in the test suite).
            await self.stop(0)
            raise

    async def _start(self, ready_timeout: float) -> None:
        cfg = self.config
        self.logging.start(self)
        # SO_REUSEPORT (grpc's default) would let a second gateway bind this port and take
        # part of its calls; only on when configured on purpose.
        server = grpc.aio.server(options=[
            *channel_options(cfg.proxy.max_message_bytes),
            ("grpc.so_reuseport", 1 if cfg.proxy.reuse_port else 0),
        ])
        self.server = server
        ray_serve_pb2_grpc.add_RayServeAPIServiceServicer_to_server(RayServeAPI(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            reflection.SERVICE_NAME,
            health.SERVICE_NAME,
            *self.methods.services(),
        ]
        reflection.enable_server_reflection(names, server)
        # Last: the catch-all forwarder; registered services above match first.
        server.add_generic_rpc_handlers((self.proxy,))
        problems = config_problems(cfg)
        if problems:
            raise OSError("; ".join(problems))
        self.port, self.tls = listen(server, cfg.proxy.host, cfg.proxy.port, cfg.proxy.tls,
                                     "proxy.tls")
        self.server = server
        # Up before the replicas, so `gateway status` can show a gateway that is STARTING.
        self.admin_port = await self.admin.start()
        self.control_loop.start()
        if self.dashboard is not None:
            await self.dashboard.start()
        if self.telemetry is not None:
            await self.telemetry.start()
            self.metrics_port = self.telemetry.prometheus_port
        if self.http is not None:
            await self.http.start()
        # Off the loop: building an exporter may import its SDK (arize: about a second).
        await asyncio.get_running_loop().run_in_executor(None, self.records.start)
        # Before any replica: calls are labelled and shaped from the first one.
        self._learn_methods(await asyncio.get_running_loop().run_in_executor(
            None, load_method_sources, cfg.proto_files.files, cfg.proto_files.import_paths,
            cfg.descriptor_sets))
        await self.controller.apply(cfg)
        await server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        ready = await self.controller.wait_ready(ready_timeout)
        if self._stopping is not None:
            return  # a shutdown arrived while we waited: it owns the state now
        self.state = ProxyState.HEALTHY
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if not ready:
            log.warning("not every application is running yet; serving what is")
        log.info("gateway listening on %s", self.address)

    async def apply(self, config: GatewayConfig) -> list[str]:
        """Apply a new goal state to the running gateway; returns what does not run as asked.

        What can fail outright (a proto module that does not import) fails before anything
        changes, so `gateway config` never shows a config that was refused.
        """
        import importlib

        modules = []
        for i, name in enumerate(config.proto_modules):
            try:
                modules.append(importlib.import_module(name))
            except Exception as e:
                # Neither the name nor the exception's text: either may quote a value the
                # operator's environment put there (a secret, for all the gateway knows).
                raise DeployError(f"proto_modules[{i}]: the module does not import "
                                  f"({type(e).__name__}); nothing was changed") from None
        problems = config_problems(config)
        if problems:
            raise DeployError("; ".join(problems) + "; nothing was changed")
        try:
            files = await asyncio.get_running_loop().run_in_executor(
                None, load_method_sources, config.proto_files.files,
                config.proto_files.import_paths, config.descriptor_sets)
        except MethodSourceError as e:
            raise DeployError(f"{e}; nothing was changed") from None
        self._method_modules = modules
        keep = {(a.name, d.name) for a in config.applications for d in a.deployments}
        self._published = {k: v for k, v in self._published.items() if k in keep}
        self._learn_methods(files)
        self.records.apply(config)
        if self.http is not None:
            self.http.apply(config)
        self.config = config
        self.logging.apply(config)
        return await self.controller.apply(config)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, let calls in flight finish within `grace`, stop replicas.

        Safe to call again (SIGTERM during an admin `Shutdown`): later calls wait for the first.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        if self.state == ProxyState.DRAINED:
            return
        grace = self.config.proxy.graceful_shutdown_timeout_s if grace is None else grace
        self.state = ProxyState.DRAINING
        self.proxy.draining = True
        log.info("draining: %d call(s) in flight get up to %gs", self.proxy.ongoing, grace)
        await self.health.enter_graceful_shutdown()
        end = self._drain_end = time.monotonic() + grace
        # Refusals are not waited for: clients retrying at once would keep `ongoing` above 0.
        # HTTP answers are, until converted and written (the proxy is done before that).
        while self._in_flight() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._in_flight():
            log.warning("drained with %d call(s) still in flight after %gs",
                        max(self.proxy.admitted, self._in_flight()), grace)
        if self.server is not None:
            await self._shut_listener(self.server)
        if self.http is not None:
            await self.http.stop()
        self.state = ProxyState.DRAINED
        # Every call has ended (and been observed): send the queued records, within a bound.
        await asyncio.get_running_loop().run_in_executor(None, self.records.shutdown)
        await self.controller.close()
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.admin.stop()
        await self.control_loop.stop()
        if self.dashboard is not None:
            await self.dashboard.stop()
        self.logging.stop()
        self._stopped.set()

    async def _shut_listener(self, server: grpc.aio.Server) -> None:
        """Stop the grpc server so that no client sees CANCELLED for a call it sent.

        Once grpc core begins its shutdown, it cancels (CANCELLED, "CANCELLED") every call it
        has not handed to us yet: calls queued while the loop was busy, and calls a client
        sent before it read the GOAWAY. Clients retrying on "draining" would keep sending
        such calls. So calls refused from now on are held until no new one has come for
        QUIET_S (at most QUIET_MAX_S): their clients wait instead of sending, and core's queue
        empties into our handler. Then the shutdown begins (GOAWAY, listener closed) and only
        then are the held calls answered UNAVAILABLE "draining"; a client's next call opens a
        new connection, which the closed port refuses (UNAVAILABLE).
        """
        gate = asyncio.Event()
        self.proxy.refusal_gate = gate
        # Held even when no call was refused yet: a call can wait in core, not yet handed to
        # us, when the drain finds nothing in flight (a busy loop, clients that retry at
        # once), and would be CANCELLED. And held even when the grace is used up (a long call
        # took it all). So the listener shuts QUIET_S after the last refusal, at most
        # QUIET_MAX_S past the grace.
        stop_at = time.monotonic() + QUIET_MAX_S
        seen, quiet_since = self.proxy.drain_refusals, time.monotonic()
        while time.monotonic() < stop_at:
            before = time.monotonic()
            await asyncio.sleep(QUIET_STEP_S)
            now = time.monotonic()
            if self.proxy.drain_refusals != seen or now - before > QUIET_STEP_S + STALL_S:
                # A refusal, or the loop itself was busy (calls may have come into grpc
                # meanwhile, not yet handed to us): not quiet. The steps are short, so a
                # stall over STALL_S is seen wherever it falls.
                seen, quiet_since = self.proxy.drain_refusals, now
            elif now - quiet_since >= QUIET_S:
                break
        # Calls still in flight now are past the grace: grpc cancels them at the end of this
        # stop, and their clients hear UNAVAILABLE (a client leaving before now is CANCELLED).
        self.proxy.cut_at_stop = self.proxy.admitted > 0
        self.health.ending.set()  # Watch streams end, having said NOT_SERVING
        stopping = asyncio.ensure_future(server.stop(
            max(HELD_ANSWER_S, self._drain_end - time.monotonic())))
        # grpc sends the GOAWAY before its stop first waits; written before the held answers.
        await asyncio.sleep(0.01)
        gate.set()
        await stopping

    def _in_flight(self) -> int:
        """Calls a drain waits for: admitted calls (gRPC and HTTP), and HTTP answers still
        being converted or written."""
        return max(self.proxy.admitted, self.http.running.pending() if self.http else 0)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _dashboard(gw: Gateway) -> Any:
    from gateway.dashboard import Dashboard, records_snapshot
    from gateway.logs.core import replica_log_file

    return Dashboard(
        gw, gw.config.dashboard, gw.proxy.observers, gw.control_loop,
        replica_log=lambda a, d, r: replica_log_file(gw.logging.replica_settings(a, d).logs_dir,
                                                     r),
        gateway_log=gw.logging.log_file, records=lambda: records_snapshot(gw.records))
