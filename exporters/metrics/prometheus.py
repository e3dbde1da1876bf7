"""Prometheus scrape endpoint: OpenTelemetry's Prometheus reader on a private registry.

One scrape shows the gateway's metrics and the custom metrics of every local replica (fetched
from the replicas over `ReplicaControl.CollectMetrics` while the scrape waits).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricReader, MetricsData
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import MetricsConfig
from gateway.metrics.exporter import MetricsExporter, MetricsSource, merge_metrics

log = logging.getLogger("exporters.prometheus")

RESERVED_PREFIXES = ("ray_serve_", "ray_component_", "grpc_", "target")
"""Replica-defined families with these names would clash with the gateway's own: dropped."""
RUNTIME_FAMILIES = frozenset({
    # Recorded by the replica runtime itself (gateway/runtime/multiplex.py), not model code.
    "ray_serve_multiplexed_model_load_latency_ms", "ray_serve_multiplexed_model_unload_latency_ms",
    "ray_serve_num_multiplexed_models", "ray_serve_multiplexed_models_load_counter",
    "ray_serve_multiplexed_models_unload_counter", "ray_serve_registered_multiplexed_model_id",
    "ray_serve_multiplexed_get_model_requests_counter",
})


class _Reader(PrometheusMetricReader):
    """The SDK's Prometheus reader, plus the gateway's histograms at every collection."""

    def __init__(self, telemetry: MetricsSource, registry: CollectorRegistry) -> None:
        super().__init__(registry=registry)
        self._telemetry = telemetry

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        t = self._telemetry
        super()._receive_metrics(  # type: ignore[no-untyped-call]
            merge_metrics(metrics_data, t.extra_metrics(), t.resource), timeout_millis, **kwargs
        )


class ReplicaCollector:
    """A prometheus_client collector yielding the local replicas' own metric families."""

    def __init__(self, telemetry: MetricsSource) -> None:
        self._telemetry = telemetry
        self._warned: set[str] = set()

    def collect(self) -> Iterable[PromMetric]:
        families: dict[str, PromMetric] = {}
        for text in self._telemetry.replica_expositions():
            try:
                parsed = list(text_string_to_metric_families(text))
            except Exception as e:  # a replica's text we cannot read: skip it, keep the rest
                log.warning("unreadable metrics from a replica: %s", e)
                continue
            for fam in parsed:
                if fam.name.startswith(RESERVED_PREFIXES) and fam.name not in RUNTIME_FAMILIES:
                    self._warn(fam.name, "uses a name reserved for the gateway's metrics")
                    continue
                have = families.get(fam.name)
                if have is None:
                    families[fam.name] = fam
                elif have.type == fam.type:
                    have.samples.extend(fam.samples)  # same metric from another replica
                else:
                    self._warn(fam.name, f"is a {fam.type} here and a {have.type} elsewhere")
        return list(families.values())

    def _warn(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("replica metric %r dropped: it %s", name, why)


class PrometheusExporter(MetricsExporter):
    """Serves `/metrics` on `metrics.prometheus.host:port` (port 0: any free port)."""

    name = "prometheus"

    def __init__(self, config: MetricsConfig, telemetry: MetricsSource) -> None:
        super().__init__(config, telemetry)
        self.registry = CollectorRegistry(auto_describe=False)
        self._reader = _Reader(telemetry, self.registry)
        self.registry.register(ReplicaCollector(telemetry))
        self.port: int | None = None
        """The bound port once started."""
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def reader(self) -> MetricReader:
        return self._reader

    async def start(self) -> None:
        cfg = self.config.prometheus
        try:
            server, thread = start_http_server(cfg.port, addr=cfg.host, registry=self.registry)
        except OSError as e:
            raise OSError(
                f"cannot serve metrics on {cfg.host}:{cfg.port}: {e.strerror or e}"
            ) from None
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", cfg.host, self.port)

    async def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return

        def close() -> None:
            server.shutdown()  # waits for the serving loop (polls every 0.5 s)
            server.server_close()
            if thread is not None:
                thread.join(5)

        await asyncio.get_running_loop().run_in_executor(None, close)
