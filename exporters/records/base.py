"""The record exporter interface and the records it exports.

A record exporter follows OpenTelemetry's exporter shape: `export(batch)`, `force_flush`,
`shutdown`. It runs on its own worker thread (the pipeline gives every exporter one bounded
queue and one thread), so it may block on I/O; it must never raise: failures come back in the
`ExportResult` and the pipeline counts them.

Third-party exporters subclass `RecordExporter` and register under the entry-point group
`grpc_gateway.record_exporters` (or are named as `module:Class` in the config).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

FeatureValue = str | bool | int | float | list[str]
TagValue = str | bool | int | float
Label = str | bool | int | float

MAX_PREDICTION_ID = 512
"""Longest prediction id a record carries (Arize's limit): longer ids become their SHA-256."""


@dataclass(slots=True)
class PredictionRecord:
    """One prediction, shaped like the arguments of Arize's `ml.log_stream`."""

    prediction_id: str
    model_name: str
    prediction_timestamp: int
    """Unix time in whole seconds (Arize rejects anything else)."""
    model_version: str | None = None
    model_type: str = "SCORE_CATEGORICAL"
    environment: str = "PRODUCTION"
    prediction_label: Label | None = None
    prediction_score: float | None = None
    features: dict[str, FeatureValue] = field(default_factory=dict)
    tags: dict[str, TagValue] = field(default_factory=dict)
    application: str = ""
    """The gateway application the call went to (also a tag; kept for routing actuals)."""

    kind: ClassVar[str] = "prediction"

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (what `dataclasses.asdict` gives, by hand: asdict's deep
        recursion cost the JSONL exporter ~5% of the gateway's CPU at 100% sampling)."""
        return {
            "kind": self.kind, "prediction_id": self.prediction_id,
            "model_name": self.model_name, "prediction_timestamp": self.prediction_timestamp,
            "model_version": self.model_version, "model_type": self.model_type,
            "environment": self.environment, "prediction_label": self.prediction_label,
            "prediction_score": self.prediction_score,
            "features": {k: list(v) if isinstance(v, list) else v
                         for k, v in self.features.items()},
            "tags": dict(self.tags), "application": self.application,
        }


@dataclass(slots=True)
class ActualRecord:
    """Ground truth for an earlier prediction, joined by model name and prediction id."""

    prediction_id: str
    model_name: str
    model_type: str = "SCORE_CATEGORICAL"
    environment: str = "PRODUCTION"
    actual_label: str | None = None
    actual_score: float | None = None
    application: str = ""

    kind: ClassVar[str] = "actual"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


Record = PredictionRecord | ActualRecord


@dataclass(slots=True)
class ExportResult:
    """What happened to a batch: every record is exactly one of exported, failed, invalid or
    dropped (an exporter may also settle records of an earlier batch whose outcome came late)."""

    exported: int = 0
    failed: int = 0
    """Sent but refused, or not sent after the retries ran out."""
    invalid: int = 0
    """Rejected before sending (the destination's validation rules)."""
    retries: int = 0
    """Extra attempts made for this batch."""
    error: str | None = None
    """A short reason for failures, for the pipeline's log (never a secret)."""
    dropped: int = 0
    """Not sent (or outcome unknown) because the gateway was stopping: counted `shutdown`."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.invalid == 0 and self.dropped == 0


@dataclass(frozen=True, slots=True)
class ExporterContext:
    """What the gateway hands every record exporter at construction."""

    logs_dir: Path
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Resolved settings of the built-in exporter of this kind (e.g. Arize keys, endpoint)."""


class RecordExporter(abc.ABC):
    """A destination for prediction records; see the module docstring for the contract."""

    name: ClassVar[str] = "record-exporter"

    def __init__(self, options: Mapping[str, Any], context: ExporterContext) -> None:
        self.options = dict(options)
        self.context = context

    @abc.abstractmethod
    def export(self, batch: Sequence[Record]) -> ExportResult:
        """Send `batch`; blocks at most about the exporter's own timeouts; never raises."""

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        """Push out anything buffered inside the exporter; True when done in time."""
        return True

    def begin_shutdown(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """The gateway is stopping: an `export` in progress should return by `deadline`
        (`time.monotonic()`), reporting what it could not send as `dropped`."""

    def outstanding(self) -> int:
        """Records sent whose outcome is not known yet; at shutdown the pipeline calls
        `export([])` once to settle them."""
        return 0

    def shutdown(self, timeout_millis: float = 30_000) -> None:  # noqa: B027 - optional hook
        """Release resources; later exports may fail. Must not raise."""
