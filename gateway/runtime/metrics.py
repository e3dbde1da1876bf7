"""What a local replica reports to the gateway about itself: memory and its custom metrics."""

from __future__ import annotations

import sys

import psutil

from gateway.pb import replica_control_pb2


def collect() -> replica_control_pb2.CollectMetricsResponse:
    mem = psutil.Process().memory_info()
    # Only when model code defined custom metrics: otherwise the SDK is never even imported.
    custom = sys.modules.get("gateway.custom_metrics")
    text = custom.exposition() if custom is not None else ""
    return replica_control_pb2.CollectMetricsResponse(
        exposition=text,
        rss_bytes=float(mem.rss),
        shared_bytes=float(getattr(mem, "shared", 0)),
    )
