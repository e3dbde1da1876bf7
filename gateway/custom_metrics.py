"""Custom metrics for model code in a local replica, in the spirit of `ray.serve.metrics`.

    from gateway.custom_metrics import Counter

    class MyModel(...Servicer):
        def __init__(self) -> None:
            self.odd = Counter("my_counter", description="Odd-numbered requests.",
                               tag_keys=("model",))
            self.odd.set_default_tags({"model": "123"})

        async def Predict(self, request, context):
            self.odd.inc()

Every series is tagged with the replica's `application`, `deployment` and `replica`, and the
gateway shows it in its own `/metrics` scrape, named like Ray's: `ray_my_counter_total`.
Recording goes through the OpenTelemetry SDK in the replica process; the gateway fetches the
Prometheus text over `ReplicaControl.CollectMetrics` when it is scraped.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

__all__ = ["Counter", "Gauge", "Histogram", "exposition"]

PREFIX = "ray"
"""Ray exposes custom metrics as `ray_<name>`; so do we, so dashboards carry over."""
AUTO_TAGS = ("application", "deployment", "replica")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_RESERVED = ("serve_", "component_", "grpc_")

_lock = threading.Lock()
_state: tuple[MeterProvider, CollectorRegistry] | None = None


def _provider() -> tuple[MeterProvider, CollectorRegistry]:
    global _state
    with _lock:
        if _state is None:
            registry = CollectorRegistry(auto_describe=False)
            # No target_info: the gateway's scrape already has one.
            reader = PrometheusMetricReader(
                disable_target_info=True, prefix=PREFIX, registry=registry
            )
            _state = (MeterProvider(metric_readers=[reader]), registry)
        return _state


def _identity() -> dict[str, str]:
    # Set by the gateway when it starts this replica process (see the controller).
    return {
        "application": os.environ.get("GATEWAY_APPLICATION", ""),
        "deployment": os.environ.get("GATEWAY_DEPLOYMENT", ""),
        "replica": os.environ.get("GATEWAY_REPLICA_ID", ""),
    }


def exposition() -> str:
    """Prometheus text of every custom metric of this process ("" when none was defined)."""
    if _state is None:
        return ""
    return generate_latest(_state[1]).decode()


class _Metric:
    def __init__(
        self, name: str, description: str = "", tag_keys: Sequence[str] | None = None
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} must match {_NAME.pattern}")
        if name.startswith(_RESERVED):
            raise ValueError(
                f"metric name {name!r}: names starting with {_RESERVED} are the gateway's own"
            )
        if isinstance(tag_keys, str):
            raise TypeError("tag_keys must be a sequence of strings, not a string")
        keys = tuple(tag_keys or ())
        for k in keys:
            if not isinstance(k, str) or not _NAME.match(k):
                raise ValueError(f"tag key {k!r} is not a valid label name")
            if k in AUTO_TAGS:
                raise ValueError(f"tag key {k!r} is set automatically; do not declare it")
        self.name = name
        self.description = description
        self.tag_keys = keys
        self._default: dict[str, str] = {}
        self._base = _identity()
        self._cache: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self._meter = _provider()[0].get_meter("gateway.custom_metrics")

    def set_default_tags(self, default_tags: Mapping[str, str]) -> _Metric:
        """Tags used when a call does not give them."""
        self._check(default_tags)
        self._default = {k: str(v) for k, v in default_tags.items()}
        self._cache.clear()
        return self

    def _check(self, tags: Mapping[str, Any]) -> None:
        unknown = set(tags) - set(self.tag_keys)
        if unknown:
            raise ValueError(
                f"metric {self.name!r}: unknown tag keys {sorted(unknown)} "
                f"(declared: {list(self.tag_keys)})"
            )

    def _attrs(self, tags: Mapping[str, str] | None) -> dict[str, str]:
        key = tuple(sorted(tags.items())) if tags else ()
        attrs = self._cache.get(key)
        if attrs is not None:
            return attrs
        if tags:
            self._check(tags)
        merged = {**self._default, **{k: str(v) for k, v in (tags or {}).items()}}
        missing = [k for k in self.tag_keys if k not in merged]
        if missing:
            raise ValueError(f"metric {self.name!r}: missing values for tags {missing}")
        attrs = {**merged, **self._base}
        if len(self._cache) < 1024:
            self._cache[key] = attrs
        return attrs


class Counter(_Metric):
    """A monotonically increasing count; exposed as `ray_<name>_total`."""

    def __init__(
        self, name: str, description: str = "", tag_keys: Sequence[str] | None = None
    ) -> None:
        super().__init__(name, description, tag_keys)
        self._inst = self._meter.create_counter(name, description=description)

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value < 0:
            raise ValueError(f"counter {self.name!r} can only go up, got {value}")
        self._inst.add(value, self._attrs(tags))


class Gauge(_Metric):
    """A value that goes up and down; the last one set is exposed."""

    def __init__(
        self, name: str, description: str = "", tag_keys: Sequence[str] | None = None
    ) -> None:
        super().__init__(name, description, tag_keys)
        self._inst = self._meter.create_gauge(name, description=description)

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._inst.set(value, self._attrs(tags))


class Histogram(_Metric):
    """A distribution over explicit `boundaries` (`_bucket`, `_sum`, `_count`)."""

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Sequence[float] | None = None,
        tag_keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__(name, description, tag_keys)
        bounds = [float(b) for b in (boundaries or ())]
        if not bounds:
            raise ValueError(f"histogram {name!r} needs bucket boundaries")
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"histogram {name!r}: boundaries must increase: {bounds}")
        self.boundaries = bounds
        self._inst = self._meter.create_histogram(
            name, description=description, explicit_bucket_boundaries_advisory=bounds
        )

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._inst.record(value, self._attrs(tags))
