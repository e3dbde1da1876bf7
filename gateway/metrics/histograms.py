"""Histograms: the buckets `observe` counted, turned into SDK metric points at collection.

The SDK offers only synchronous histograms (~6.5 us a `record`, five per call), so the buckets
are counted by the per-call aggregate and handed to the readers as SDK `Metric` points when
they collect (`histogram_metrics`), the way the OpenTelemetry spec's MetricProducer does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
)

from gateway.metrics.aggregate import A66_LATENCY_BOUNDS_S, A66_SIZE_BOUNDS, Series, a66_method

_Labels = tuple[tuple[str, str], ...]


class _Hist:
    """Buckets being summed over series for one label set at collection time."""

    __slots__ = ("buckets", "count", "max", "min", "start_ns", "sum")

    def __init__(self, n: int, start_ns: int) -> None:
        self.buckets = [0] * n
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = 0.0
        self.start_ns = start_ns

    def add(self, buckets: list[int], total: float, lo: float, hi: float, start_ns: int) -> None:
        b = self.buckets
        for i, v in enumerate(buckets):
            b[i] += v
        self.count += sum(buckets)
        self.sum += total
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.start_ns = min(self.start_ns, start_ns)


def _hist_metric(
    name: str, description: str, unit: str, bounds: Sequence[float],
    groups: dict[_Labels, _Hist], now: int,
) -> Metric:
    points = [
        HistogramDataPoint(
            attributes=dict(labels), start_time_unix_nano=h.start_ns, time_unix_nano=now,
            count=h.count, sum=h.sum, bucket_counts=list(h.buckets),
            explicit_bounds=[float(b) for b in bounds], min=h.min if h.count else 0.0, max=h.max,
        )
        for labels, h in groups.items()
    ]
    return Metric(
        name=name, description=description, unit=unit,
        data=Histogram(data_points=points,
                       aggregation_temporality=AggregationTemporality.CUMULATIVE),
    )


def histogram_metrics(series: Sequence[Series], lat_bounds: Sequence[float]) -> list[Metric]:
    """The histograms of `series`, as SDK metric points (cumulative)."""
    now = time.time_ns()
    n_lat, n_s, n_b = len(lat_bounds) + 1, len(A66_LATENCY_BOUNDS_S) + 1, len(A66_SIZE_BOUNDS) + 1
    latency: dict[_Labels, _Hist] = {}
    processing: dict[_Labels, _Hist] = {}
    duration: dict[_Labels, _Hist] = {}
    sent: dict[_Labels, _Hist] = {}
    rcvd: dict[_Labels, _Hist] = {}

    def group(d: dict[_Labels, _Hist], key: _Labels, n: int, start: int) -> _Hist:
        h = d.get(key)
        if h is None:
            h = d[key] = _Hist(n, start)
        return h

    key: _Labels
    for s in series:
        lat = list(s.lat)  # copied first: the loop may be adding to it
        if s.reached_replica:
            key = (("application", s.app), ("deployment", s.deployment),
                   ("replica", s.replica), ("route", s.app))
            group(processing, key, n_lat, s.start_ns).add(
                lat, s.lat_sum, s.lat_min, s.lat_max, s.start_ns)
        if s.http:
            continue  # the HTTP proxy's own rows: gateway/metrics/http.py
        key = (("application", s.app), ("method", s.method), ("route", s.app),
               ("status_code", s.status))
        group(latency, key, n_lat, s.start_ns).add(lat, s.lat_sum, s.lat_min, s.lat_max,
                                                  s.start_ns)
        key = (("grpc.method", a66_method(s.method)), ("grpc.status", s.status))
        group(duration, key, n_s, s.start_ns).add(
            list(s.s), s.lat_sum / 1000.0, s.lat_min / 1000.0, s.lat_max / 1000.0, s.start_ns)
        group(sent, key, n_b, s.start_ns).add(
            list(s.sent), s.sent_sum, s.sent_min, s.sent_max, s.start_ns)
        group(rcvd, key, n_b, s.start_ns).add(
            list(s.rcvd), s.rcvd_sum, s.rcvd_min, s.rcvd_max, s.start_ns)
    b = lat_bounds
    return [
        _hist_metric("ray_serve_grpc_request_latency_ms",
                     "The end-to-end latency of gRPC requests (measured from the gateway), "
                     "in ms.", "", b, latency, now),
        _hist_metric("ray_serve_deployment_processing_latency_ms",
                     "The latency for queries to be processed (seen from the gateway), in ms.",
                     "", b, processing, now),
        _hist_metric("grpc.server.call.duration",
                     "End-to-end time taken to complete a call from the server's view.",
                     "s", A66_LATENCY_BOUNDS_S, duration, now),
        _hist_metric("grpc.server.call.sent_total_compressed_message_size",
                     "Total bytes (compressed, not including grpc framing) sent across all "
                     "response messages per RPC.", "By", A66_SIZE_BOUNDS, sent, now),
        _hist_metric("grpc.server.call.rcvd_total_compressed_message_size",
                     "Total bytes (compressed, not including grpc framing) received across "
                     "all request messages per RPC.", "By", A66_SIZE_BOUNDS, rcvd, now),
    ]
