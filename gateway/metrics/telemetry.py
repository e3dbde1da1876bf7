"""Metrics of every call and of the control plane, through the OpenTelemetry SDK: the catalogue.

Names and labels follow Ray Serve 2.60 (so Ray dashboards and alerts keep working), beside the
standard gRPC metrics of gRFC A66. The per-call observer only counts into plain numbers
(gateway/metrics/aggregate.py); everything else happens when a reader collects:

- counters are SDK observable counters reading those numbers (an SDK `counter.add` costs ~6 us),
  projected here on each metric's labels;
- gauges are SDK observable gauges reading live state (gateway/metrics/gauges.py);
- histograms: the SDK offers only synchronous ones, so the buckets are counted by the
  aggregate and handed to the readers as SDK points (gateway/metrics/histograms.py);
- the local replicas' own metrics are fetched while a scrape waits (replica_scrape.py).

Metric exporters are plug-ins (gateway/metrics/exporter.py); `MetricsExporter` stays importable
from here and from `gateway.telemetry`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Metric
from opentelemetry.sdk.resources import Resource

from gateway.config import MetricsConfig
from gateway.control.state import ReplicaSlot
from gateway.hooks import RunningGateway
from gateway.metrics.aggregate import OK, UNKNOWN_APPLICATION, CallAggregate, Series, a66_method
from gateway.metrics.exporter import SCOPE, MetricsExporter, load_exporter_class, merge_metrics
from gateway.metrics.gauges import LiveGauges
from gateway.metrics.histograms import histogram_metrics
from gateway.metrics.instance import instance_id
from gateway.metrics.replica_scrape import ReplicaScrape

log = logging.getLogger("gateway.telemetry")

__all__ = ["UNKNOWN_APPLICATION", "MetricsExporter", "Telemetry", "load_exporter_class",
           "merge_metrics"]


def _short_id() -> str:
    return secrets.token_hex(4)


class Telemetry:
    """The gateway's instruments; `observe` is the per-call observer, `on_replica_event` the
    controller listener. Build it, attach both (gateway/app.py), `await start()`, `await stop()`.
    """

    def __init__(self, config: MetricsConfig, gateway: RunningGateway) -> None:
        self.config = config
        self.aggregate = CallAggregate(config.latency_buckets_ms)
        self.observe = self.aggregate.observe
        """Count one finished call: the aggregate's own method, so no extra call per call."""
        self._handles: dict[tuple[str, str], str] = {}
        # Ray identifies the proxy by actor and node ids; these identify this gateway process.
        self.actor_id = secrets.token_hex(16)
        self.node_id = secrets.token_hex(28)
        self.gauges = LiveGauges(gateway, self.actor_id, self.node_id, self._handle)
        self.scrape = ReplicaScrape(self.gauges.slot_list)
        self.resource = Resource.create({"service.name": "grpc-gateway",
                                         "service.instance.id": instance_id()})
        self.exporters: list[MetricsExporter] = []
        if config.prometheus.enabled:
            self.exporters.append(load_exporter_class("prometheus")(config, self))
        if config.otlp.enabled:
            self.exporters.append(load_exporter_class("otlp")(config, self))
        self.provider = MeterProvider(
            metric_readers=[e.reader() for e in self.exporters], resource=self.resource
        )
        self.extra_sources: list[Callable[[], list[Metric]]] = []
        """More histograms to export with these (the HTTP rows: gateway/metrics/http.py)."""
        self._instruments()

    def on_replica_event(self, event: str, slot: ReplicaSlot) -> None:
        """Controller listener: remember the replicas to report, forget stopped ones."""
        if event == "stopped":
            self.gauges.slots.pop(slot.replica_id, None)
            self.aggregate.retire(slot.replica_id)
        else:
            self.gauges.slots[slot.replica_id] = slot

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.scrape.loop = asyncio.get_running_loop()
        try:
            for e in self.exporters:
                await e.start()
        except BaseException:
            await self.stop()  # e.g. the metrics port is taken: no pusher thread left behind
            raise

    async def stop(self) -> None:
        for e in self.exporters:
            try:
                await e.stop()
            except Exception:
                log.exception("metric exporter %s failed to stop", e.name)
        # Off the loop: a final OTLP push may take up to its timeout.
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown_provider)

    def _shutdown_provider(self) -> None:
        try:
            self.provider.shutdown(timeout_millis=5_000)
        except Exception:
            log.exception("meter provider shutdown failed")

    @property
    def prometheus_port(self) -> int | None:
        for e in self.exporters:
            port = getattr(e, "port", None)
            if isinstance(port, int):
                return port
        return None

    # -- collection (reader threads) -----------------------------------------------------------

    def _handle(self, app: str, dep: str) -> str:
        h = self._handles.get((app, dep))
        if h is None:
            # setdefault is atomic: two reader threads agree on one id.
            h = self._handles.setdefault((app, dep), _short_id())
        return h

    def extra_metrics(self) -> list[Metric]:
        """The histograms, as SDK metric points (cumulative); readers export them with the rest."""
        return [*histogram_metrics(self.aggregate.series(), self.aggregate.lat_bounds),
                *(m for source in self.extra_sources for m in source())]

    def replica_expositions(self) -> list[str]:
        """Prometheus text of every running local replica's custom metrics (bounded wait)."""
        return self.scrape.expositions()

    # -- the catalogue -------------------------------------------------------------------------

    def _instruments(self) -> None:
        g = self.gauges
        m = self.provider.get_meter(SCOPE.name, SCOPE.version)

        def counter(name: str, desc: str, fn: Callable[[], Iterable[Observation]],
                    unit: str = "") -> None:
            m.create_observable_counter(name, [lambda _o: fn()], unit=unit, description=desc)

        def gauge(name: str, desc: str, fn: Callable[[], Iterable[Observation]],
                  unit: str = "") -> None:
            m.create_observable_gauge(name, [lambda _o: fn()], unit=unit, description=desc)

        counter("ray_serve_num_grpc_requests", "The number of gRPC requests processed.",
                self._requests)
        counter("ray_serve_num_grpc_error_requests", "The number of non-OK gRPC responses.",
                self._errors)
        counter("ray_serve_num_deployment_grpc_error_requests",
                "The number of non-OK gRPC responses returned by each deployment.",
                self._deployment_errors)
        counter("ray_serve_num_router_requests", "The number of requests processed by the router.",
                self._router_requests)
        counter("ray_serve_handle_request_counter",
                "The number of requests processed by this DeploymentHandle.",
                self._handle_requests)
        counter("ray_serve_deployment_request_counter",
                "The number of queries that have been processed in this replica.",
                self._replica_requests)
        counter("ray_serve_deployment_error_counter",
                "The number of exceptions that have occurred in the deployment.",
                self._replica_errors)
        counter("ray_serve_deployment_replica_starts",
                "The number of times this replica has been started (restarts after failures).",
                g.replica_starts)
        counter("grpc.server.call.started", "The total number of RPCs started on the server "
                "(counted when the call ends).", self._calls_started, unit="{call}")
        gauge("ray_serve_num_ongoing_grpc_requests",
              "The number of ongoing requests in the gRPC Proxy.", g.ongoing)
        gauge("ray_serve_deployment_queued_queries",
              "The number of queries for this deployment waiting to be assigned to a replica.",
              g.queued)
        gauge("ray_serve_num_scheduling_tasks",
              "The number of request scheduling tasks in the router.", g.scheduling)
        gauge("ray_serve_num_scheduling_tasks_in_backoff",
              "The number of request scheduling tasks in the router that are undergoing "
              "backoff (calls waiting because every replica is busy).", g.scheduling)
        gauge("ray_serve_replica_processing_queries",
              "The current number of queries being processed.", g.processing)
        gauge("ray_serve_replica_pending_queries",
              "The current number of pending queries at the replica (the gateway never sends a "
              "replica more than max_ongoing_requests, so calls wait in the gateway's queue).",
              g.pending)
        gauge("ray_serve_deployment_replica_healthy",
              "Whether this deployment replica is healthy. 1 means healthy, 0 unhealthy.",
              g.healthy)
        gauge("ray_component_rss_mb", "Resident set size of the component, in MB (1e6 bytes).",
              g.rss)
        gauge("ray_component_mem_shared_bytes", "Shared memory of the component, in bytes.",
              g.shared)
        gauge("ray_component_cpu_percentage",
              "CPU use of the component since the previous scrape, in percent of one core.",
              g.cpu)

    # Counters: sums over the per-call series, projected on each metric's labels.

    def _project(
        self, labels: Callable[[Series], tuple[tuple[str, str], ...] | None]
    ) -> list[Observation]:
        sums: dict[tuple[tuple[str, str], ...], int] = {}
        for s in self.aggregate.series():
            key = labels(s)
            if key is not None:
                sums[key] = sums.get(key, 0) + s.n
        return [Observation(v, dict(k)) for k, v in sums.items()]

    def _requests(self) -> list[Observation]:
        return self._project(lambda s: None if s.http else (
            ("application", s.app), ("method", s.method), ("route", s.app),
            ("status_code", s.status)))

    def _errors(self) -> list[Observation]:
        return self._project(lambda s: None if s.code is OK or s.http else (
            ("application", s.app), ("error_code", s.status), ("method", s.method),
            ("route", s.app)))

    def _deployment_errors(self) -> list[Observation]:
        return self._project(lambda s: None if s.code is OK or not s.deployment or s.http else (
            ("application", s.app), ("deployment", s.deployment), ("error_code", s.status),
            ("method", s.method), ("route", s.app)))

    def _router_requests(self) -> list[Observation]:
        return self._project(lambda s: None if not s.deployment else (
            ("actor_id", self.actor_id), ("application", s.app), ("deployment", s.deployment),
            ("handle", self._handle(s.app, s.deployment)), ("route", s.app)))

    def _handle_requests(self) -> list[Observation]:
        return self._project(lambda s: None if not s.deployment else (
            ("application", s.app), ("deployment", s.deployment),
            ("handle", f"{s.app}#{s.deployment}#{self._handle(s.app, s.deployment)}"),
            ("route", s.app)))

    def _replica_requests(self) -> list[Observation]:
        return self._project(lambda s: None if not s.reached_replica else (
            ("application", s.app), ("deployment", s.deployment), ("replica", s.replica),
            ("route", s.app)))

    def _replica_errors(self) -> list[Observation]:
        return self._project(lambda s: None if not s.replica_error else (
            ("application", s.app), ("deployment", s.deployment), ("replica", s.replica),
            ("route", s.app)))

    def _calls_started(self) -> list[Observation]:
        return self._project(lambda s: None if s.http else (
            ("grpc.method", a66_method(s.method)),))
