"""The config sections of the observers (logging, metrics, prediction records), and the base
every section of the config shares (gateway/config.py assembles them into `GatewayConfig`)."""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.dataplane.listen_address import bare_host


class StrictModel(BaseModel):
    """Unknown keys are errors; a parsed config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoggingConfig(StrictModel):
    """Logging settings; set on the gateway, an application or a deployment (the narrower wins)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None
    """Minimum level of records that are emitted."""
    encoding: Literal["TEXT", "JSON"] | None = None
    """TEXT for people, JSON (one object per line) for Loki or ELK."""
    logs_dir: str | None = None
    """Directory of the per-component log files."""
    disable_access_log: bool | None = None
    """Drop the one-line-per-call access log."""
    stream_replica_logs: bool | None = None
    """Also copy replica logs to the console of a foreground `gateway run`."""
    max_bytes: int | None = Field(default=None, ge=0)
    """Rotate a log file past this size (0: never); default from RAY_ROTATION_MAX_BYTES."""
    backup_count: int | None = Field(default=None, ge=0)
    """Rotated files kept; default from RAY_ROTATION_BACKUP_COUNT (0: none, the file starts
    over when it reaches max_bytes)."""

    def merged_over(self, base: LoggingConfig | None) -> LoggingConfig:
        """This config's set fields laid over `base` (deployment over application over gateway)."""
        if base is None:
            return self
        return base.model_copy(update=self.model_dump(exclude_none=True))


class FieldMapping(StrictModel):
    """Which fields of a custom proto's request and response become features, label and score."""

    features: list[str] = Field(default_factory=list)
    """Dotted paths of request fields used as features."""
    prediction_label: str | None = None
    """Dotted path of the response field holding the predicted label."""
    prediction_score: str | None = None
    """Dotted path of the response field holding the prediction score."""
    request_type: str | None = None
    """Full protobuf name of the request message (default: the method's input type)."""
    response_type: str | None = None
    """Full protobuf name of the response message (default: the method's output type)."""
    column_names: dict[str, list[str]] = Field(default_factory=dict)
    """Open Inference Protocol: feature names for the columns of an input tensor (tensor name ->
    one name per column; default `<tensor>_<column>`)."""


class PredictionRecordsConfig(StrictModel):
    """Per-application prediction records, decoded off the call path and sent to exporters."""

    enabled: bool = False
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of calls that become records."""
    exporters: list[str] = Field(default_factory=lambda: ["default"])
    """Names of record exporters ("default": Arize when keys are set, JSONL otherwise)."""
    model_name: str | None = None
    """Model name sent with each record and actual (default: the application's name)."""
    multiplexed_model_id: Literal["model_name", "tag"] = "model_name"
    """A call's `multiplexed_model_id` is its record's model name (each id its own model in
    Arize; actuals then name it too), or only its `multiplexed_model_id` tag."""
    model_version: str | None = None
    model_type: Literal[
        "SCORE_CATEGORICAL", "BINARY_CLASSIFICATION", "NUMERIC", "REGRESSION"
    ] = "SCORE_CATEGORICAL"
    """An `arize.ml.types.ModelTypes` name: categorical (label and score) or numeric (score)."""
    environment: Literal["PRODUCTION"] = "PRODUCTION"
    """An `arize.ml.types.Environments` name (live traffic is production)."""
    methods: list[str] | None = None
    """Full method names that produce records (default: every method)."""
    field_mapping: FieldMapping | None = None
    """For protos other than the Open Inference Protocol."""
    mapper: str | None = None
    """`module:function` that turns a decoded call into records."""
    max_payload_bytes: int = Field(default=1 << 20, ge=0)
    """Payloads larger than this are not captured (the record says so)."""


class PrometheusConfig(StrictModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    _bare = field_validator("host")(bare_host)


class OTLPConfig(StrictModel):
    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4317"
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    interval_s: float = Field(default=10.0, gt=0)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout_s: float = Field(default=10.0, gt=0)


class MetricsConfig(StrictModel):
    enabled: bool = True
    """Off: no instruments are recorded at all (for measuring what telemetry costs)."""
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    otlp: OTLPConfig = Field(default_factory=OTLPConfig)
    latency_buckets_ms: list[float] = Field(
        default_factory=lambda: [
            0.1, 0.25, 0.5, 0.75, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500,
            1000, 2000, 5000, 10000, 60000, 120000, 300000, 600000,
        ]
    )
    """Histogram boundaries in ms; finer than Ray's so a sub-millisecond hop is visible."""

    @model_validator(mode="after")
    def _increasing(self) -> MetricsConfig:
        b = self.latency_buckets_ms
        if any(x >= y for x, y in itertools.pairwise(b)):
            raise ValueError("latency_buckets_ms must be strictly increasing")
        return self


class ArizeConfig(StrictModel):
    api_key: SecretStr | None = None
    """Default: the ARIZE_API_KEY environment variable."""
    space_id: SecretStr | None = None
    """Default: the ARIZE_SPACE_ID environment variable."""
    api_scheme: str | None = None
    api_host: str | None = None
    api_port: int | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    """Per request; the SDK has none of its own."""
    max_retries: int = Field(default=5, ge=0)
    """Retries of connection errors, 429 and 5xx (other 4xx are never retried)."""
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    max_workers: int = Field(default=4, ge=1)
    """Concurrent HTTP requests of the SDK."""


class RecordExporterConfig(StrictModel):
    """A named record exporter: a built-in entry point name or `module:Class`."""

    name: str
    type: str
    options: dict[str, Any] = Field(default_factory=dict)
    queue_size: int = Field(default=10000, ge=1)


class RecordsConfig(StrictModel):
    exporters: list[RecordExporterConfig] = Field(default_factory=list)
    """Extra named exporters; `arize`, `jsonl` and `default` exist without being listed."""
    arize: ArizeConfig = Field(default_factory=ArizeConfig)
    jsonl_path: str | None = None
    """Default: `<logs_dir>/records.jsonl`."""
    queue_size: int = Field(default=10000, ge=1)
    """Sampled calls waiting to be decoded; past it calls are dropped (and counted)."""
    batch_size: int = Field(default=100, ge=1)
    """Records handed to an exporter at once."""
    flush_interval_s: float = Field(default=1.0, gt=0)
    """Longest a record waits for its batch to fill."""
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    """Time the exporters get to send what is queued when the gateway stops."""

    @model_validator(mode="after")
    def _unique_exporters(self) -> RecordsConfig:
        names = [e.name for e in self.exporters]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate record exporter names: {sorted(dup)}")
        return self
