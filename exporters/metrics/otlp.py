"""OTLP push: OpenTelemetry's OTLP metric exporter (gRPC or HTTP/protobuf) on a period."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)

from gateway.config import MetricsConfig, OTLPConfig
from gateway.metrics.exporter import MetricsExporter, MetricsSource, merge_metrics

log = logging.getLogger("exporters.otlp")


def build_exporter(cfg: OTLPConfig) -> MetricExporter:
    """The SDK's OTLP exporter for `cfg` (headers are secrets: passed on, never logged)."""
    headers = {k: v.get_secret_value() for k, v in cfg.headers.items()}
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        scheme = urlsplit(cfg.endpoint).scheme
        return GrpcExporter(
            endpoint=cfg.endpoint, insecure=scheme != "https", headers=headers or None,
            timeout=cfg.timeout_s,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    endpoint = cfg.endpoint
    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/metrics"
    return HttpExporter(endpoint=endpoint, headers=headers or None, timeout=cfg.timeout_s)


class _Merging(MetricExporter):
    """Adds the gateway's histograms to each batch, then hands it to the SDK exporter."""

    def __init__(self, inner: MetricExporter, telemetry: MetricsSource) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._telemetry = telemetry
        self.failures = 0
        """Exports the collector refused or that did not arrive."""

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        t = self._telemetry
        try:
            data = merge_metrics(metrics_data, t.extra_metrics(), t.resource)
            result = self._inner.export(data, timeout_millis=timeout_millis, **kwargs)
        except Exception:  # an exporter never raises into the SDK's thread
            log.exception("OTLP metric export failed")
            result = MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self.failures += 1
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class OTLPExporter(MetricsExporter):
    """Pushes every `metrics.otlp.interval_s` to `metrics.otlp.endpoint`."""

    name = "otlp"

    def __init__(self, config: MetricsConfig, telemetry: MetricsSource) -> None:
        super().__init__(config, telemetry)
        cfg = config.otlp
        self.exporter = _Merging(build_exporter(cfg), telemetry)
        self._reader = PeriodicExportingMetricReader(
            self.exporter,
            export_interval_millis=cfg.interval_s * 1000,
            export_timeout_millis=cfg.timeout_s * 1000,
        )

    def reader(self) -> MetricReader:
        return self._reader
