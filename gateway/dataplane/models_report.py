"""Reads a replica's multiplexed-models report from a plain gRPC call's trailers
(gateway/runtime/models_trailer.py) into `Replica.mux_models`, as mux result frames do."""

from __future__ import annotations

from typing import Any

from gateway.dataplane.replicas import Replica
from gateway.runtime.models_trailer import MODELS_KEY, decode

__all__ = ["MODELS_KEY", "take_report"]


def take_report(replica: Replica, trailing: Any) -> None:
    """Apply the report among `trailing`, if any (decoded only when it changed)."""
    if replica.mux_capacity is None or not trailing:
        return
    for key, value in trailing:
        if key == MODELS_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if value != replica.mux_report:
                got = decode(value)
                if got is not None:
                    replica.mux_report = value
                    replica.mux_models = frozenset(got[0])
                    replica.mux_capacity = got[1]
            return
