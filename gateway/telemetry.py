"""Kept for third-party metric exporters: `gateway.telemetry.MetricsExporter` (see README)."""

from gateway.metrics.telemetry import MetricsExporter

__all__ = ["MetricsExporter"]
