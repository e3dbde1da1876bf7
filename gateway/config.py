"""The gateway's goal state: a YAML file shaped like Ray Serve's config, validated by pydantic.

One `GatewayConfig` is built at start-up (or by `gateway deploy`) and passed down; nothing
deeper in the code reads the environment for settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# Re-exported: callers import every section from here.
from gateway.config_observers import ArizeConfig as ArizeConfig
from gateway.config_observers import FieldMapping as FieldMapping
from gateway.config_observers import LoggingConfig as LoggingConfig
from gateway.config_observers import MetricsConfig as MetricsConfig
from gateway.config_observers import OTLPConfig as OTLPConfig
from gateway.config_observers import PredictionRecordsConfig as PredictionRecordsConfig
from gateway.config_observers import PrometheusConfig as PrometheusConfig
from gateway.config_observers import RecordExporterConfig as RecordExporterConfig
from gateway.config_observers import RecordsConfig as RecordsConfig
from gateway.config_observers import StrictModel as _Model
from gateway.config_source import ConfigError as ConfigError
from gateway.config_source import expand_env as expand_env
from gateway.config_source import hide_values, plain_json
from gateway.config_source import read_yaml as read_yaml
from gateway.config_source import unexpanded as unexpanded
from gateway.dataplane.listen_address import bare_host, collide, is_loopback
from gateway.tls import ClientTLSConfig, ServerTLSConfig

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
"""gRPC takes message limits as a C int."""


def _printable_name(value: str, what: str) -> str:
    if not value.isprintable():
        raise ValueError(f"{what} {value!r} contains control characters")
    return value


DNS_SCHEME = "dns:///"
"""gRPC's name syntax: `dns:///name:port` is every address `name` resolves to."""


def dns_name(target: str) -> tuple[str, int] | None:
    """(host, port) of a `dns:///host:port` target; None for a plain `host:port`."""
    if not target.startswith(DNS_SCHEME):
        return None
    host, _, port = target[len(DNS_SCHEME):].rpartition(":")
    # Normalised, so two spellings of one name are one name: DNS is case-insensitive, a
    # trailing dot is the same (absolute) name, and "050051" is port 50051.
    return host.strip("[]").rstrip(".").lower(), int(port)


def _check_target(target: str) -> None:
    rest = target
    if target.startswith("dns:"):
        if not target.startswith(DNS_SCHEME):
            # dns://8.8.8.8/name:port names a DNS server; the gateway uses the system's.
            raise ValueError(f"target {target!r}: write DNS names as 'dns:///name:port' "
                             "(three slashes; the system resolver is used, a DNS server "
                             "in the target is not supported)")
        rest = target[len(DNS_SCHEME):]
    host, sep, port = rest.rpartition(":")
    if (not sep or not host or "/" in host or not host.isprintable()
            or not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"target {target!r} must look like 'host:port' or "
                         "'dns:///name:port' (port 1-65535)")


class DeploymentConfig(_Model):
    """One deployment: local replicas started by the gateway, or external `targets`."""

    name: str = Field(min_length=1)
    import_path: str | None = None
    """`module:Class` of a servicer subclassing a generated `...Servicer` (local replicas)."""
    targets: list[str] | None = None
    """Addresses (`host:port`) of replicas that someone else runs (external replicas), or
    `dns:///name:port`: every address the name resolves to is a replica."""
    dns_refresh_s: float = Field(default=10.0, gt=0)
    """How often `dns:///` targets are resolved again (also whenever a replica of theirs
    cannot be reached)."""
    num_replicas: int = Field(default=1, ge=0)
    max_ongoing_requests: int = Field(default=5, ge=1)
    """Calls in flight per replica before calls queue."""
    max_queued_requests: int = Field(default=100, ge=0)
    """Calls waiting for a replica before RESOURCE_EXHAUSTED."""
    user_config: dict[str, Any] | None = None
    """Passed to the servicer's `reconfigure(user_config)` on start and on change."""

    @field_validator("user_config")
    @classmethod
    def _json_user_config(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # It travels to the replica as JSON: a YAML date or a set would be accepted here and
        # then fail every start and reconfigure of the deployment.
        plain_json(v, "user_config")
        return v
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
            names = [dns_name(t) for t in self.targets if dns_name(t) is not None]
            if len(set(names)) != len(names):
                raise ValueError("a 'dns:///' target is listed twice")
            if "num_replicas" in self.model_fields_set and any(
                    dns_name(t) is not None for t in self.targets):
                raise ValueError("num_replicas would be ignored: with a 'dns:///' target "
                                 "there is one replica per address the name resolves to")
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
    route_prefix: str | None = None
    """HTTP path prefix routed to this application (Ray's field; the longest match wins)."""
    multiplexed_model_id_from: Literal["metadata", "oip_model_name"] = "metadata"
    """Where a call's multiplexed model id comes from: the `multiplexed_model_id` metadata
    only, or also (when that key is absent) an Open Inference Protocol request's `model_name`."""

    @model_validator(mode="after")
    def _names(self) -> ApplicationConfig:
        _printable_name(self.name, "application name")
        rp = self.route_prefix
        if rp is not None and (not rp.startswith("/") or (rp != "/" and rp.endswith("/"))
                               or "//" in rp or not rp.isprintable() or " " in rp
                               or "{" in rp or "}" in rp or len(rp) > 200):
            raise ValueError(f"route_prefix {rp[:200]!r} must start with '/', not end with '/' "
                             "(unless it is '/'), and hold no spaces, braces or '//'")
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
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    """The gateway process's event loop (read at start). uvloop costs less per call through
    external replicas but batches fewer mux frames to local ones (README: "The event loop");
    without it installed the gateway warns and runs on asyncio's."""


class HttpConfig(_Model):
    """The HTTP ingress: Open Inference Protocol REST and JSON transcoding (Ray's port 8000)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    _bare = field_validator("host")(bare_host)
    tls: ServerTLSConfig | None = None
    """Serve HTTPS (and mTLS with `client_ca_file`); the files are re-read when they change."""
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Time a client has to send a request's body (answered 408 past it), and to finish its
    headers or send its next request on an idle keep-alive connection (closed past it)."""
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Open HTTP connections at most; a new one past it is answered 503 and closed."""


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


class DashboardConfig(_Model):
    """The web dashboard (pages and the JSON API behind them), served by the gateway itself."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8265, ge=0, le=65535)
    """Ray's dashboard port, so bookmarks and scripts keep working."""
    _bare = field_validator("host")(bare_host)
    tls: ServerTLSConfig | None = None
    """Serve HTTPS; with `client_ca_file` (mTLS) a client certificate admits the browser, so
    the dashboard may listen beyond loopback without `admin.token`."""
    prometheus_url: str | None = None
    """A Prometheus that scrapes this gateway: the pages link to it (nothing is read from it)."""

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s\"'<>]+", value):
            raise ValueError("prometheus_url must be an http:// or https:// URL")
        return value


class ProtoFilesConfig(_Model):
    """`.proto` files compiled at start (grpcio-tools' protoc) for their method shapes.

    `proto_files: [a.proto, b.proto]` is short for `proto_files: {files: [a.proto, b.proto]}`.
    """

    files: list[str] = Field(default_factory=list)
    import_paths: list[str] = Field(default_factory=list)
    """protoc's `-I`; without any, each file's own directory."""

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"files": value} if isinstance(value, list) else value


class GatewayConfig(_Model):
    """The whole goal state."""

    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    """When `admin.token` is set, the dashboard asks for it too."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging_config: LoggingConfig = Field(default_factory=LoggingConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    proto_modules: list[str] = Field(default_factory=list)
    """Extra generated `_pb2` modules whose methods the gateway should know by name."""
    proto_files: ProtoFilesConfig = Field(default_factory=ProtoFilesConfig)
    descriptor_sets: list[str] = Field(default_factory=list)
    """Serialized FileDescriptorSets (`protoc --descriptor_set_out --include_imports`)."""
    applications: list[ApplicationConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_apps(self) -> GatewayConfig:
        names = [a.name for a in self.applications]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate application names: {sorted(dup)}")
        listeners = [("proxy.port", self.proxy.host, self.proxy.port),
                     ("admin.port", self.admin.host, self.admin.port)]
        if self.http.enabled:
            listeners.append(("http.port", self.http.host, self.http.port))
        if self.metrics.enabled and self.metrics.prometheus.enabled:
            prom = self.metrics.prometheus
            listeners.append(("metrics.prometheus.port", prom.host, prom.port))
        if self.dashboard.enabled:
            listeners.append(("dashboard.port", self.dashboard.host, self.dashboard.port))
        dash_mutual = (self.dashboard.tls is not None
                       and self.dashboard.tls.client_ca_file is not None)
        if (self.dashboard.enabled and self.admin.token is None and not dash_mutual
                and not is_loopback(self.dashboard.host)):
            raise ValueError(f"the dashboard on {self.dashboard.host} (not loopback) needs "
                             "admin.token or dashboard.tls.client_ca_file: it shows the "
                             "replicas' logs and configuration")
        for i, (key, host, port) in enumerate(listeners):
            for other, other_host, other_port in listeners[:i]:
                # The same port on two different addresses is fine (not on all interfaces).
                if port and port == other_port and collide(host, other_host):
                    raise ValueError(f"{key} {port} is also {other}: each listener needs "
                                     "its own port")
        prefixes = [a.route_prefix for a in self.applications if a.route_prefix is not None]
        dup = {p for p in prefixes if prefixes.count(p) > 1}
        if dup:
            raise ValueError(f"duplicate route_prefix values: {sorted(dup)}")
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
    try:
        if expand:
            data, used = expand_env(data, source, env)
        return _arize_keys_from_env(GatewayConfig.model_validate(data), env)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
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
