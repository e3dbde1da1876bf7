"""Kept for third-party metric exporters: `gateway.telemetry.MetricsExporter` (see README)."""

from gateway.metrics.exporter import MetricsExporter

__all__ = ["MetricsExporter"]
