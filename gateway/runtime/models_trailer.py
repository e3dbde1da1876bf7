"""The multiplexed models a replica holds, told to the gateway in the trailing metadata of plain
gRPC calls (streaming methods, or `local_transport: grpc`); mux calls carry the same report in
their result frames (gateway/runtime/mux_server.py). The gateway reads it and strips it
(gateway/dataplane/models_report.py); clients never see it.

The value is ASCII JSON `[ids, capacity]`, at most MAX_BYTES (the most recently used ids fit),
encoded once per change of the replica's models."""

from __future__ import annotations

import json

MODELS_KEY = "gateway-multiplexed-models"
MAX_BYTES = 4096
"""Well under grpc's 8 KiB default for all of a call's metadata."""

_cache: tuple[int, str] = (-1, "")


def encode(ids: list[str], capacity: int) -> str:
    value = json.dumps([ids, capacity], ensure_ascii=True, separators=(",", ":"))
    while len(value) > MAX_BYTES and ids:
        ids = ids[len(ids) // 4 + 1:]  # drop the least recently used quarter
        value = json.dumps([ids, capacity], ensure_ascii=True, separators=(",", ":"))
    return value


def current() -> str:
    """This replica's report now (cached until its models change)."""
    global _cache
    from gateway.runtime.multiplex import registry

    version, value = _cache
    if version != registry.version:
        ids, cap = registry.report()
        value = encode(ids, cap)
        _cache = (registry.version, value)
    return value


def decode(value: str) -> tuple[list[str], int] | None:
    """(ids, capacity) of a report, or None when it is not one."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if (isinstance(data, list) and len(data) == 2 and isinstance(data[0], list)
            and all(isinstance(i, str) for i in data[0]) and isinstance(data[1], int)
            and not isinstance(data[1], bool) and data[1] >= 0):
        return data[0], data[1]
    return None
