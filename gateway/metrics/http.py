"""The seed's HTTP proxy rows, counted by the HTTP ingress.

`ray_serve_num_http_requests`, `ray_serve_num_http_error_requests` (non-200 answers),
`ray_serve_num_deployment_http_error_requests`, `ray_serve_http_request_latency_ms` and
`ray_serve_num_ongoing_http_requests`, with Ray's labels. `route` is the matched route template
or prefix (bounded), `method` the HTTP method, `status_code`/`error_code` the HTTP status. The
per-deployment and per-replica rows count HTTP calls through the proxy's own observer.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
)

UNKNOWN_APPLICATION = "unknown"
"""The application label of requests routed to none (as the gRPC rows do)."""

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
"""HTTP methods with a `method` label of their own; any other (PROPFIND, made-up tokens) is
`other`, so clients cannot grow the label set."""
OTHER_METHOD = "other"

_Key = tuple[str, str, str, str, str]
"""route, HTTP method, application, deployment, status code."""


class _Row:
    __slots__ = ("buckets", "max", "min", "n", "start_ns", "sum")

    def __init__(self, n_buckets: int) -> None:
        self.n = 0
        self.buckets = [0] * n_buckets
        self.sum = 0.0
        self.min = float("inf")
        self.max = 0.0
        self.start_ns = time.time_ns()


class HttpMetrics:
    """Per-request counting on the loop; projections for the SDK's reader threads."""

    def __init__(self, bounds_ms: Sequence[float], node_id: str, node_ip: str) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds_ms))
        self.node_id = node_id
        self.node_ip = node_ip
        self.ongoing = 0
        """HTTP requests being answered (the ongoing-HTTP gauge)."""
        self._rows: dict[_Key, _Row] = {}

    def observe(self, route: str, method: str, application: str, deployment: str,
                status: int, latency_s: float) -> None:
        if method not in METHODS:
            method = OTHER_METHOD
        key = (route, method, application or UNKNOWN_APPLICATION, deployment, str(status))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(len(self.bounds) + 1)
        ms = latency_s * 1000.0
        row.n += 1
        row.buckets[bisect_left(self.bounds, ms)] += 1
        row.sum += ms
        row.min = min(row.min, ms)
        row.max = max(row.max, ms)

    # -- collection (reader threads) ---------------------------------------------------------

    def _items(self) -> list[tuple[_Key, _Row]]:
        return list(self._rows.items())

    def _project(self, labels: Callable[[_Key], dict[str, str] | None]) -> list[Observation]:
        sums: dict[tuple[tuple[str, str], ...], int] = {}
        for key, row in self._items():
            got = labels(key)
            if got is not None:
                k = tuple(sorted(got.items()))
                sums[k] = sums.get(k, 0) + row.n
        return [Observation(v, dict(k)) for k, v in sums.items()]

    def requests(self) -> list[Observation]:
        return self._project(lambda k: {"route": k[0], "method": k[1], "application": k[2],
                                        "status_code": k[4]})

    def errors(self) -> list[Observation]:
        return self._project(lambda k: None if k[4] == "200" else {
            "route": k[0], "error_code": k[4], "method": k[1], "application": k[2]})

    def deployment_errors(self) -> list[Observation]:
        return self._project(lambda k: None if k[4] == "200" or not k[3] else {
            "deployment": k[3], "error_code": k[4], "method": k[1], "route": k[0],
            "application": k[2]})

    def ongoing_gauge(self) -> list[Observation]:
        return [Observation(self.ongoing, {"node_id": self.node_id,
                                           "node_ip_address": self.node_ip})]

    def histograms(self) -> list[Metric]:
        now = time.time_ns()
        groups: dict[tuple[tuple[str, str], ...], _Row] = {}
        for (route, method, app, _dep, status), row in self._items():
            labels = (("application", app), ("method", method), ("route", route),
                      ("status_code", status))
            g = groups.get(labels)
            if g is None:
                g = groups[labels] = _Row(len(self.bounds) + 1)
                g.start_ns = row.start_ns
            for i, v in enumerate(list(row.buckets)):
                g.buckets[i] += v
            g.n += row.n
            g.sum += row.sum
            g.min = min(g.min, row.min)
            g.max = max(g.max, row.max)
            g.start_ns = min(g.start_ns, row.start_ns)
        points = [
            HistogramDataPoint(
                attributes=dict(labels), start_time_unix_nano=g.start_ns, time_unix_nano=now,
                count=sum(g.buckets), sum=g.sum, bucket_counts=list(g.buckets),
                explicit_bounds=list(self.bounds), min=g.min if g.n else 0.0, max=g.max,
            )
            for labels, g in groups.items()
        ]
        return [Metric(
            name="ray_serve_http_request_latency_ms",
            description="The end-to-end latency of HTTP requests (measured from the gateway's "
                        "HTTP proxy), in ms.",
            unit="",
            data=Histogram(data_points=points,
                           aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )]

    def register(self, meter: Any) -> None:
        """The counters and the gauge, as observable instruments of the gateway's meter."""

        def counter(name: str, desc: str, fn: Callable[[], list[Observation]]) -> None:
            meter.create_observable_counter(name, [lambda _o: fn()], description=desc)

        counter("ray_serve_num_http_requests", "The number of HTTP requests processed.",
                self.requests)
        counter("ray_serve_num_http_error_requests", "The number of non-200 HTTP responses.",
                self.errors)
        counter("ray_serve_num_deployment_http_error_requests",
                "The number of non-200 HTTP responses returned by each deployment.",
                self.deployment_errors)
        meter.create_observable_gauge(
            "ray_serve_num_ongoing_http_requests", [lambda _o: self.ongoing_gauge()],
            description="The number of ongoing requests in the HTTP Proxy.")
