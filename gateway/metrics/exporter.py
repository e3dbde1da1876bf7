"""The metric exporter plug-in: its base class, how one is found, and how readers add the
gateway's histograms to what the SDK collected.

Metric exporters (Prometheus, OTLP, third-party ones) are found through the entry-point group
`grpc_gateway.metric_exporters`; each subclasses `MetricsExporter` and gives the SDK one reader.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import entry_points
from typing import ClassVar, Protocol

from opentelemetry.sdk.metrics.export import (
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.config import MetricsConfig

ENTRY_POINT_GROUP = "grpc_gateway.metric_exporters"
SCOPE = InstrumentationScope("grpc_gateway", "0.1.0")


class MetricsSource(Protocol):
    """What an exporter reads from the gateway's telemetry at collection time."""

    @property
    def resource(self) -> Resource: ...

    def extra_metrics(self) -> list[Metric]:
        """The histograms, as SDK metric points (see `merge_metrics`)."""
        ...

    def replica_expositions(self) -> list[str]:
        """Prometheus text of the local replicas' own (custom) metrics."""
        ...


class MetricsExporter(abc.ABC):
    """A metric exporter plug-in: gives the SDK one reader, may run a server or a thread.

    Registered under the entry-point group `grpc_gateway.metric_exporters`. Readers must add
    `telemetry.extra_metrics()` to what they export (see `merge_metrics`).
    """

    name: ClassVar[str]

    def __init__(self, config: MetricsConfig, telemetry: MetricsSource) -> None:
        self.config = config
        self.telemetry = telemetry

    @abc.abstractmethod
    def reader(self) -> MetricReader:
        """The reader the meter provider feeds; built once."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start serving or pushing (called once the gateway runs)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop; must not raise."""


def load_exporter_class(name: str) -> type[MetricsExporter]:
    """The exporter class registered as `name` in `grpc_gateway.metric_exporters`."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, MetricsExporter)):
                raise TypeError(f"metric exporter {name!r} ({ep.value}) is not a MetricsExporter")
            return cls
    raise LookupError(f"no metric exporter named {name!r} in entry points {ENTRY_POINT_GROUP!r}")


def merge_metrics(data: MetricsData | None, extra: Sequence[Metric], resource: Resource) -> (
    MetricsData
):
    """`data` (from the SDK) with `extra` added to the gateway's scope."""
    if not extra:
        return data if data is not None else MetricsData(resource_metrics=[])
    if data is None or not data.resource_metrics:
        return MetricsData(
            resource_metrics=[
                ResourceMetrics(
                    resource=resource,
                    scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=list(extra), schema_url="")],
                    schema_url="",
                )
            ]
        )
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == SCOPE.name:
            scopes[i] = replace(sm, metrics=[*sm.metrics, *extra])
            break
    else:
        scopes.append(ScopeMetrics(scope=SCOPE, metrics=list(extra), schema_url=""))
    return MetricsData(resource_metrics=[replace(first, scope_metrics=scopes), *rest])
