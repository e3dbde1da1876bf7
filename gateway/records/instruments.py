"""The record pipeline's health as OpenTelemetry observable instruments, read at collection
(nothing is recorded per call: they read the pipeline's plain counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.metrics import MeterProvider, Observation

from gateway.records.workers import ExporterStats, ExporterWorker


def register_metrics(
    provider: MeterProvider, stats: dict[str, ExporterStats], workers: dict[str, ExporterWorker],
    calls_dropped: dict[str, int], intake_depth: Callable[[], int],
) -> None:
    """Exporter health as OpenTelemetry observable instruments (read at collection): `stats`,
    `workers` and `calls_dropped` are the pipeline's own dicts, read as they are then."""
    meter = provider.get_meter("grpc_gateway.records", "0.1.0")

    def per_exporter(value: Callable[[ExporterStats, ExporterWorker], int]) -> Callable[
        [Any], list[Observation]
    ]:
        def cb(_options: Any) -> list[Observation]:
            return [Observation(value(stats[n], w), {"exporter": n})
                    for n, w in list(workers.items()) if n in stats]
        return cb

    def dropped(_options: Any) -> list[Observation]:
        out = [Observation(v, {"exporter": n, "reason": r})
               for n, s in list(stats.items()) for r, v in list(s.dropped.items())]
        out += [Observation(v, {"exporter": "", "reason": r})
                for r, v in list(calls_dropped.items())]
        return out

    meter.create_observable_counter(
        "grpc_gateway_records_exported", [per_exporter(lambda s, w: s.exported)],
        description="Prediction records (and actuals) an exporter delivered.")
    meter.create_observable_counter(
        "grpc_gateway_records_failed", [per_exporter(lambda s, w: s.failed)],
        description="Records an exporter could not deliver (refused, or retries ran out).")
    meter.create_observable_counter(
        "grpc_gateway_records_retries", [per_exporter(lambda s, w: s.retries)],
        description="Extra delivery attempts of records (connection errors, 429, 5xx).")
    meter.create_observable_counter(
        "grpc_gateway_records_dropped", [dropped],
        description="Records (exporter set) or sampled calls (exporter empty) dropped, by "
                    "reason.")
    meter.create_observable_gauge(
        "grpc_gateway_records_queue_depth", [per_exporter(lambda s, w: w.depth)],
        description="Records waiting in an exporter's queue.")

    def intake(_options: Any) -> list[Observation]:
        return [Observation(intake_depth(), {})]

    meter.create_observable_gauge(
        "grpc_gateway_records_intake_depth", [intake],
        description="Sampled calls waiting to be decoded into records.")
