"""The seven `ray_serve_*multiplexed*` metrics of a replica (gateway/runtime/multiplex.py),
through the replica's custom-metrics SDK (gateway/custom_metrics.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

loaded_ids: Callable[[], list[str]] = list
"""The ids loaded now (set by gateway/runtime/multiplex.py, which this must not import)."""

LATENCY_BOUNDS_MS = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 120000.0, 300000.0,
)
"""Model loads take milliseconds (a small sklearn model) to minutes (a large download)."""


class _Metrics:
    """The seven Ray rows, through the replica's custom-metrics SDK (one instance a process)."""

    _instance: _Metrics | None = None

    def __init__(self) -> None:
        from gateway import custom_metrics

        meter = custom_metrics._provider()[0].get_meter("gateway.multiplex")
        self.attrs = custom_metrics._identity()
        # Named without the `ray_` prefix: the custom-metrics reader adds it, as Ray's own.
        self.load_latency = meter.create_histogram(
            "serve_multiplexed_model_load_latency_ms", description="The time it takes to load "
            "a model.", explicit_bucket_boundaries_advisory=LATENCY_BOUNDS_MS)
        self.unload_latency = meter.create_histogram(
            "serve_multiplexed_model_unload_latency_ms", description="The time it takes to "
            "unload a model.", explicit_bucket_boundaries_advisory=LATENCY_BOUNDS_MS)
        self.num_models = meter.create_gauge(
            "serve_num_multiplexed_models",
            description="The number of models loaded on the current replica.")
        self.loads = meter.create_counter(
            "serve_multiplexed_models_load_counter",
            description="The number of times models loaded on the current replica.")
        self.unloads = meter.create_counter(
            "serve_multiplexed_models_unload_counter",
            description="The number of times models unloaded on the current replica.")
        # Observed at each scrape over the models loaded now: an unloaded id's series goes
        # away, so churning through many ids keeps the scrape bounded.
        meter.create_observable_gauge(
            "serve_registered_multiplexed_model_id", callbacks=[self._registered],
            description="The mutlplexed model ID registered on the current replica.")
        self.requests = meter.create_counter(
            "serve_multiplexed_get_model_requests_counter",
            description="The number of calls to get a multiplexed model.")
        # Series from the start (at zero), so rates and "no unloads yet" show on dashboards.
        self.num_models.set(0, self.attrs)
        self.loads.add(0, self.attrs)
        self.unloads.add(0, self.attrs)

    @classmethod
    def get(cls) -> _Metrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _registered(self, options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [Observation(1, {**self.attrs, "model_id": i}) for i in loaded_ids()]
