"""The gateway's goal state: a YAML file shaped like Ray Serve's config, validated by pydantic.

One `GatewayConfig` is built at start-up (or by `gateway deploy`) and passed down; nothing
deeper in the code reads the environment for settings.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# Re-exported: callers import these from here.
from gateway.config_source import ConfigError as ConfigError
from gateway.config_source import expand_env as expand_env
from gateway.config_source import hide_values
from gateway.config_source import read_yaml as read_yaml
from gateway.config_source import unexpanded as unexpanded
from gateway.dataplane.listen_address import bare_host, collide, is_loopback
from gateway.tls import ClientTLSConfig, ServerTLSConfig

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
"""gRPC takes message limits as a C int."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoggingConfig(_Model):
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


class FieldMapping(_Model):
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


class PredictionRecordsConfig(_Model):
    """Per-application prediction records, decoded off the call path and sent to exporters."""

    enabled: bool = False
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of calls that become records."""
    exporters: list[str] = Field(default_factory=lambda: ["default"])
    """Names of record exporters ("default": Arize when keys are set, JSONL otherwise)."""
    model_name: str | None = None
    """Model name sent with each record and actual (default: the application's name)."""
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


def _printable_name(value: str, what: str) -> str:
    if not value.isprintable():
        raise ValueError(f"{what} {value!r} contains control characters")
    return value


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r} must look like 'host:port' (port 1-65535)")


class DeploymentConfig(_Model):
    """One deployment: local replicas started by the gateway, or external `targets`."""

    name: str = Field(min_length=1)
    import_path: str | None = None
    """`module:Class` of a servicer subclassing a generated `...Servicer` (local replicas)."""
    targets: list[str] | None = None
    """Addresses (`host:port`) of replicas that someone else runs (external replicas)."""
    num_replicas: int = Field(default=1, ge=0)
    max_ongoing_requests: int = Field(default=5, ge=1)
    """Calls in flight per replica before calls queue."""
    max_queued_requests: int = Field(default=100, ge=0)
    """Calls waiting for a replica before RESOURCE_EXHAUSTED."""
    user_config: dict[str, Any] | None = None
    """Passed to the servicer's `reconfigure(user_config)` on start and on change."""
    health_check_period_s: float = Field(default=2.0, gt=0)
    health_check_timeout_s: float = Field(default=2.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=5.0, ge=0)
    """Time a stopping replica gets to finish its calls."""
    logging_config: LoggingConfig | None = None
    tls: ClientTLSConfig | None = None
    """TLS to the external replicas (`targets`); absent: plaintext."""

    @model_validator(mode="after")
    def _one_kind(self) -> DeploymentConfig:
        if (self.import_path is None) == (self.targets is None):
            raise ValueError("set exactly one of 'import_path' (local) or 'targets' (external)")
        _printable_name(self.name, "deployment name")
        if self.import_path is not None and not _IMPORT_PATH.fullmatch(self.import_path):
            raise ValueError(f"import_path {self.import_path!r} must look like 'module:Class'")
        if self.targets is not None:
            if not self.targets:
                raise ValueError("'targets' must list at least one address")
            for target in self.targets:
                _check_target(target)
            if ("num_replicas" in self.model_fields_set
                    and self.num_replicas != len(self.targets)):
                raise ValueError(f"num_replicas {self.num_replicas} would be ignored: with "
                                 f"'targets' there is one replica per address "
                                 f"({len(self.targets)})")
        if self.tls is not None and self.targets is None:
            raise ValueError("'tls' is for external replicas ('targets'); local replicas "
                             "listen on loopback and are reached in plaintext")
        return self

    @property
    def is_local(self) -> bool:
        return self.import_path is not None


class ApplicationConfig(_Model):
    """An application: the unit clients address with the `application` metadata key."""

    name: str = Field(min_length=1)
    deployments: list[DeploymentConfig] = Field(min_length=1)
    ingress: str | None = None
    """Deployment that receives the application's calls (default: the first)."""
    logging_config: LoggingConfig | None = None
    prediction_records: PredictionRecordsConfig = Field(default_factory=PredictionRecordsConfig)

    @model_validator(mode="after")
    def _names(self) -> ApplicationConfig:
        _printable_name(self.name, "application name")
        names = [d.name for d in self.deployments]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate deployment names: {sorted(dup)}")
        if self.ingress is not None and self.ingress not in names:
            raise ValueError(f"ingress {self.ingress!r} is not one of the deployments {names}")
        return self

    @property
    def ingress_deployment(self) -> DeploymentConfig:
        name = self.ingress or self.deployments[0].name
        return next(d for d in self.deployments if d.name == name)


class ProxyConfig(_Model):
    """The client-facing gRPC listener."""

    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535)
    _bare = field_validator("host")(bare_host)
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=MAX_GRPC_MESSAGE_BYTES)
    """Largest message accepted from clients or replicas; larger ones get RESOURCE_EXHAUSTED."""
    request_timeout_s: float | None = Field(default=None, gt=0)
    """Deadline applied when the client sets none (None: no deadline)."""
    retries: int = Field(default=2, ge=0)
    """Other replicas tried when a replica cannot be reached before it received anything."""
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)
    """Time calls in flight get to finish when the gateway drains."""
    reuse_port: bool = False
    """Let other processes bind the same port (SO_REUSEPORT), for several gateways sharing
    one port on purpose. Off: a second gateway on the port fails to start."""
    local_transport: Literal["mux", "grpc"] = "mux"
    """How unary calls reach local replicas: multiplexed over an open stream (cheaper), or one
    gRPC call each. External replicas always get plain gRPC calls."""
    tls: ServerTLSConfig | None = None
    """Serve TLS (and mTLS with `client_ca_file`); the files are re-read when they change."""


class AdminConfig(_Model):
    """The admin gRPC service behind `gateway status/config/deploy/shutdown`."""

    host: str = "127.0.0.1"
    port: int = Field(default=9001, ge=0, le=65535)
    _bare = field_validator("host")(bare_host)
    token: SecretStr | None = None
    """When set, admin calls must send `authorization: Bearer <token>`. Required when `host`
    is not a loopback address; an empty token is refused (it would switch authentication
    off without anyone noticing)."""
    tls: ServerTLSConfig | None = None
    """Serve TLS; with `client_ca_file` (mTLS) a client certificate authenticates callers,
    so the service may listen beyond loopback without a token."""

    @model_validator(mode="after")
    def _auth(self) -> AdminConfig:
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("admin.token is empty: set a token, or remove the key to run "
                             "the admin service without authentication on loopback")
        mutual = self.tls is not None and self.tls.client_ca_file is not None
        if self.token is None and not mutual and not is_loopback(self.host):
            raise ValueError(f"the admin service on {self.host} (not loopback) needs a token "
                             "or tls.client_ca_file: anyone who reaches it could deploy or "
                             "shut the gateway down")
        return self


class PrometheusConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    _bare = field_validator("host")(bare_host)


class OTLPConfig(_Model):
    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4317"
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    interval_s: float = Field(default=10.0, gt=0)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout_s: float = Field(default=10.0, gt=0)


class MetricsConfig(_Model):
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


class ArizeConfig(_Model):
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


class RecordExporterConfig(_Model):
    """A named record exporter: a built-in entry point name or `module:Class`."""

    name: str
    type: str
    options: dict[str, Any] = Field(default_factory=dict)
    queue_size: int = Field(default=10000, ge=1)


class RecordsConfig(_Model):
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


class GatewayConfig(_Model):
    """The whole goal state."""

    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging_config: LoggingConfig = Field(default_factory=LoggingConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    proto_modules: list[str] = Field(default_factory=list)
    """Extra generated `_pb2` modules whose methods the gateway should know by name."""
    applications: list[ApplicationConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_apps(self) -> GatewayConfig:
        names = [a.name for a in self.applications]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate application names: {sorted(dup)}")
        listeners = [("proxy.port", self.proxy.host, self.proxy.port),
                     ("admin.port", self.admin.host, self.admin.port)]
        if self.metrics.enabled and self.metrics.prometheus.enabled:
            prom = self.metrics.prometheus
            listeners.append(("metrics.prometheus.port", prom.host, prom.port))
        for i, (key, host, port) in enumerate(listeners):
            for other, other_host, other_port in listeners[:i]:
                # The same port on two different addresses is fine (not on all interfaces).
                if port and port == other_port and collide(host, other_host):
                    raise ValueError(f"{key} {port} is also {other}: each listener needs "
                                     "its own port")
        known = {"default", "arize", "jsonl", *(e.name for e in self.records.exporters)}
        for app in self.applications:
            unknown = [n for n in app.prediction_records.exporters if n not in known]
            if unknown:
                raise ValueError(f"application {app.name!r}: prediction_records.exporters "
                                 f"{unknown} are not defined; known: {sorted(known)}")
        return self

    def application(self, name: str) -> ApplicationConfig | None:
        return next((a for a in self.applications if a.name == name), None)

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by '**********'."""
        out: dict[str, Any] = _redact(self.model_dump(mode="python"))
        return out


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _arize_keys_from_env(config: GatewayConfig, env: Mapping[str, str]) -> GatewayConfig:
    """ARIZE_API_KEY / ARIZE_SPACE_ID fill the Arize keys the file leaves unset (read here,
    once; they stay secrets: redacted in every dump)."""
    arize = config.records.arize
    update: dict[str, Any] = {}
    for field, var in (("api_key", "ARIZE_API_KEY"), ("space_id", "ARIZE_SPACE_ID")):
        if getattr(arize, field) is None and env.get(var):
            update[field] = SecretStr(env[var])
    if not update:
        return config
    records = config.records.model_copy(update={"arize": arize.model_copy(update=update)})
    return config.model_copy(update={"records": records})


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def parse_config(
    data: Any,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    expand: bool = True,
) -> GatewayConfig:
    """Validate already-parsed YAML data; errors name `source` and each bad key path.

    `${VAR}` references are expanded from `env` (default: this process's environment) unless
    `expand` is false: a deploy arrives already expanded by `gateway deploy`, in the
    operator's environment. The Arize keys left unset are taken from `env` either way.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    env = os.environ if env is None else env
    used: dict[str, str] = {}
    if expand:
        data, used = expand_env(data, source, env)
    try:
        return _arize_keys_from_env(GatewayConfig.model_validate(data), env)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {_loc(tuple(err['loc']))}: {hide_values(msg, used)}")
        raise ConfigError("\n".join(lines)) from None


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read, expand and validate a config file."""
    return parse_config(read_yaml(path), str(Path(path)), env)
