"""What a local replica reports to the gateway about itself (memory; custom metrics later)."""

from __future__ import annotations

import psutil

from gateway.pb import replica_control_pb2


def collect() -> replica_control_pb2.CollectMetricsResponse:
    mem = psutil.Process().memory_info()
    return replica_control_pb2.CollectMetricsResponse(
        exposition="",
        rss_bytes=float(mem.rss),
        shared_bytes=float(getattr(mem, "shared", 0)),
    )
