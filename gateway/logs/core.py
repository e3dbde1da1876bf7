"""Structured logs for the gateway and its local replicas.

One logger tree under the root name `gateway`; every line carries level, timestamp,
application, deployment, replica, request id, route and message, in TEXT (for people) or JSON
(one object per line, for Loki or ELK). Each component writes its own file under the logs
directory: `gateway.log` for the gateway, `replica_<app>_<deployment>_<suffix>.log` per replica,
each rotated by size (`RAY_ROTATION_MAX_BYTES` / `RAY_ROTATION_BACKUP_COUNT`, or the config).

The access log (one line per call, at the gateway and in each replica) never formats on the
call path: the call only appends to a bounded buffer that a background thread drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import functools
import inspect
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import grpc

from gateway.logs import write_errors
from gateway.logs.escape import escape, escape_field, escape_lines
from gateway.runtime.sync_stream import sync_stream

if TYPE_CHECKING:
    # Types only: a replica process imports this module and should not pay for pydantic.
    from gateway.app import Gateway
    from gateway.config import GatewayConfig, LoggingConfig
    from gateway.control.controller import DeploymentState, ReplicaSlot
    from gateway.dataplane.proxy import CallRecord

ROOT = "gateway"
TREES = (ROOT, "exporters")
"""Logger trees the gateway's handlers serve (exporters are plug-ins living beside gateway/)."""
ACCESS = "gateway.access"
ENV_MAX_BYTES = "RAY_ROTATION_MAX_BYTES"
ENV_BACKUP_COUNT = "RAY_ROTATION_BACKUP_COUNT"
ENV_MEMORY_PROFILING = "GATEWAY_ENABLE_MEMORY_PROFILING"
ENV_REPLICA_LOGGING = "GATEWAY_LOGGING"
"""How the gateway hands a replica process its resolved logging settings (JSON)."""
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # Ray's defaults
DEFAULT_BACKUP_COUNT = 5
GATEWAY_LOG_FILE = "gateway.log"
REQUEST_ID_KEYS = ("x-request-id", "request_id")
# Calls the replica serves for the gateway itself: not user traffic, so no access line.
INTERNAL_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", "/gateway.internal.")
_FIELDS = ("application", "deployment", "replica", "request_id", "route")
_MAX_ROUTE = 200

log = logging.getLogger("gateway.logs")


# -- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogSettings:
    """Logging settings with every default filled in (config over environment over Ray's)."""

    log_level: str = "INFO"
    encoding: str = "TEXT"
    logs_dir: str = "logs"
    disable_access_log: bool = False
    stream_replica_logs: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    backup_count: int = DEFAULT_BACKUP_COUNT

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LogSettings:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", key, raw)
        return default
    return max(value, 0)


def resolve(
    cfg: LoggingConfig | None, logs_dir: Path | str | None, env: Mapping[str, str]
) -> LogSettings:
    """Fill the unset fields of `cfg`: rotation from the environment, the rest from defaults.

    An explicit `logs_dir` (the gateway's own) wins over the config's.
    """

    def get(key: str) -> Any:
        return getattr(cfg, key) if cfg is not None else None

    max_bytes, backup_count = get("max_bytes"), get("backup_count")
    stream = get("stream_replica_logs")
    return LogSettings(
        log_level=get("log_level") or "INFO",
        encoding=get("encoding") or "TEXT",
        logs_dir=str(Path(logs_dir or get("logs_dir") or "logs").resolve()),
        disable_access_log=bool(get("disable_access_log")),
        stream_replica_logs=True if stream is None else bool(stream),
        max_bytes=(
            max_bytes if max_bytes is not None
            else _env_int(env, ENV_MAX_BYTES, DEFAULT_MAX_BYTES)
        ),
        backup_count=(
            backup_count if backup_count is not None
            else _env_int(env, ENV_BACKUP_COUNT, DEFAULT_BACKUP_COUNT)
        ),
    )


def replica_logging_config(config: GatewayConfig, app: str, deployment: str) -> LoggingConfig:
    """Deployment's logging_config over the application's over the gateway's."""
    merged = config.logging_config
    app_cfg = config.application(app)
    if app_cfg is not None:
        if app_cfg.logging_config is not None:
            merged = app_cfg.logging_config.merged_over(merged)
        dep = next((d for d in app_cfg.deployments if d.name == deployment), None)
        if dep is not None and dep.logging_config is not None:
            merged = dep.logging_config.merged_over(merged)
    return merged


def safe_name(replica_id: str) -> str:
    """A replica id (`app#Deployment#suffix`) as a file-name part."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in replica_id)


def replica_log_file(logs_dir: Path | str, replica_id: str) -> Path:
    return Path(logs_dir) / f"replica_{safe_name(replica_id)}.log"


# -- request context and formatting ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    route: str


_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "gateway_call", default=None
)


def current_request_id() -> str:
    """The request id of the call being served (in a replica), or ""."""
    c = _call.get()
    return c.request_id if c is not None else ""


@contextlib.contextmanager
def call_context(request_id: str, route: str) -> Iterator[None]:
    token = _call.set(CallContext(request_id, route))
    try:
        yield
    finally:
        _call.reset(token)


class ContextFilter(logging.Filter):
    """Gives every record the component's identity and the current call's request id/route.

    Fields a record already has (the access log sets them per call) are kept.
    """

    def __init__(
        self, component: str, application: str = "", deployment: str = "", replica: str = ""
    ) -> None:
        super().__init__()
        self.component = component
        self.identity = {"application": application, "deployment": deployment,
                         "replica": replica}

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        if "component" not in d:
            d["component"] = self.component
        for key, value in self.identity.items():
            if key not in d:
                d[key] = value
        if "request_id" not in d or "route" not in d:
            c = _call.get()
            d.setdefault("request_id", c.request_id if c is not None else "")
            d.setdefault("route", c.route if c is not None else "")
        return True


def _asctime(record: logging.LogRecord) -> str:
    t = time.localtime(record.created)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + f",{int(record.msecs):03d}"


class TextFormatter(logging.Formatter):
    """`LEVEL date time application deployment replica request_id route file:line - message`,
    Ray Serve's field order, with `-` for a field that does not apply.

    One record is one line: fields and message are escaped (they carry request ids, method
    paths, application names and other strings from clients and models).
    """

    def format(self, record: logging.LogRecord) -> str:
        d = record.__dict__
        fields = " ".join(escape_field(d.get(k)) for k in _FIELDS)
        where = "access" if d.get("access") else f"{record.filename}:{record.lineno}"
        line = (
            f"{record.levelname} {_asctime(record)} {fields} {where} - "
            f"{escape(record.getMessage())}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + escape_lines(record.exc_text)
        if record.stack_info:
            line += "\n" + escape_lines(self.formatStack(record.stack_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, keys named as in Ray Serve's JSON logs plus a few more."""

    def format(self, record: logging.LogRecord) -> str:
        d = record.__dict__
        out: dict[str, Any] = {
            "levelname": record.levelname,
            "asctime": _asctime(record),
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "component": d.get("component", ""),
        }
        for key in _FIELDS:
            out[key] = d.get(key) or ""
        out["logger"] = record.name
        out["filename"] = record.filename
        out["lineno"] = record.lineno
        out["pid"] = record.process
        out["message"] = record.getMessage()
        if d.get("access"):
            out["method"] = d.get("method", "")
            out["status"] = d.get("status", "")
            out["latency_ms"] = d.get("latency_ms", 0.0)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def formatter(encoding: str) -> logging.Formatter:
    return JsonFormatter() if encoding == "JSON" else TextFormatter()


class _RotatingFileHandler(logging.handlers.RotatingFileHandler):
    """With `backupCount=0` the stdlib's rollover reopens the same file for appending, so it
    grows without limit; here it starts the file over instead (no backups kept)."""

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115

    def handleError(self, record: logging.LogRecord) -> None:
        write_errors.report(self, record)  # once on stderr, then counted (not per line)


def file_handler(path: Path, settings: LogSettings) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    h = _RotatingFileHandler(
        path, maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
    )
    h.setFormatter(formatter(settings.encoding))
    return h


# -- the access log ----------------------------------------------------------------------


class AccessLog:
    """Per-call access lines, written in batches on the event loop.

    The call path only appends the item to a bounded list; a timer on the same loop formats
    what gathered every `interval_s` and writes it with one write per handler. A writer
    thread was tried first: contending for the GIL with the loop and grpc's poller thread,
    it cost ~90 us of gateway CPU per call, against ~15 us for formatting the line itself.
    When the list is full, items are dropped and counted, never waited for.
    """

    def __init__(
        self,
        logger: logging.Logger,
        to_record: Callable[[Any], logging.LogRecord | None],
        max_pending: int = 10_000,
        interval_s: float = 0.05,
    ) -> None:
        self.logger = logger
        self.to_record = to_record
        self.max_pending = max_pending
        self.interval_s = interval_s
        self.dropped = 0
        self.written = 0
        self._buf: list[Any] = []
        self._scheduled = False

    def __call__(self, item: Any) -> None:
        buf = self._buf
        if len(buf) >= self.max_pending:
            self.dropped += 1
            return
        buf.append(item)
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop here: written by flush() or close()
            self._scheduled = True
            loop.call_later(self.interval_s, self._on_timer)

    def _on_timer(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Format and write everything pending."""
        items, self._buf = self._buf, []
        records = []
        for item in items:
            try:
                record = self.to_record(item)
            except Exception:  # a bad item must not stop the others
                log.exception("access log entry could not be written")
                continue
            if record is not None:
                records.append(record)
        if records:
            emit_batch(self.logger, records)
            self.written += len(records)

    def close(self) -> None:
        """Write what is pending."""
        self.flush()


def _write_rotating(h: logging.handlers.RotatingFileHandler, lines: list[str]) -> None:
    """Write `lines`, rolling over before a line would take the file past `maxBytes`."""
    stream: Any = h.stream
    stream.seek(0, 2)
    size = stream.tell()
    chunk: list[str] = []
    for line in lines:
        if size > 0 and size + len(line) >= h.maxBytes:
            stream.write("".join(chunk))
            chunk = []
            h.doRollover()
            stream = h.stream
            size = 0
        chunk.append(line)
        size += len(line)
    stream.write("".join(chunk))


def emit_batch(logger: logging.Logger, records: list[logging.LogRecord]) -> None:
    """What `logger.handle` does for each record, with one write and flush per stream handler
    instead of one per record (and one rollover check per batch)."""
    records = [r for r in records if logger.filter(r)]
    node: logging.Logger | None = logger
    while node is not None:
        for h in node.handlers:
            batch = [r for r in records if r.levelno >= h.level and h.filter(r)]
            if not batch:
                continue
            if not isinstance(h, logging.StreamHandler):
                for r in batch:
                    h.handle(r)
                continue
            try:
                lines = [h.format(r) + h.terminator for r in batch]
            except Exception:
                log.exception("access log lines could not be formatted")
                continue
            h.acquire()
            try:
                if isinstance(h, logging.FileHandler) and h.stream is None:
                    h.stream = h._open()
                if isinstance(h, logging.handlers.RotatingFileHandler) and h.maxBytes > 0:
                    _write_rotating(h, lines)
                else:
                    h.stream.write("".join(lines))  # type: ignore[union-attr]
                h.flush()
            except Exception:
                h.handleError(batch[0])
            finally:
                h.release()
        node = node.parent if node.propagate else None


def access_record(
    logger: logging.Logger,
    *,
    method: str,
    code: grpc.StatusCode,
    latency_s: float,
    end_time: float,
    request_id: str,
    application: str,
    deployment: str,
    replica: str,
) -> logging.LogRecord | None:
    level = logging.INFO if code is grpc.StatusCode.OK else logging.WARNING
    if not logger.isEnabledFor(level):
        return None
    route = method if len(method) <= _MAX_ROUTE else method[:_MAX_ROUTE] + "..."
    latency_ms = round(latency_s * 1000, 3)
    record = logger.makeRecord(
        logger.name, level, "access", 0, "%s %s %.1fms", (route, code.name, latency_ms), None,
        extra={
            "access": True, "method": route, "status": code.name, "latency_ms": latency_ms,
            "request_id": request_id, "route": route, "application": application,
            "deployment": deployment, "replica": replica,
        },
    )
    record.created = end_time
    record.msecs = (end_time - int(end_time)) * 1000
    return record


# -- the gateway process -----------------------------------------------------------------


class GatewayLogging:
    """The gateway's log handlers, access log and replica-log plumbing.

    `start(gw)` attaches handlers to the `gateway` logger and hooks into the proxy and the
    controller; `stop()` flushes and detaches them, so tests can run gateways one after another.
    """

    def __init__(
        self,
        config: GatewayConfig,
        logs_dir: Path | None,
        console: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = dict(os.environ if env is None else env)  # read once, at start-up
        self.config = config
        self.settings = resolve(config.logging_config, logs_dir, self.env)
        self.logs_dir = Path(self.settings.logs_dir)
        self.console = console
        self.access: AccessLog | None = None
        self._handlers: list[logging.Handler] = []
        self._saved: dict[str, tuple[int, bool]] = {}
        self._gw: Gateway | None = None
        self._access_config = config
        self._access_levels: dict[tuple[str, str], int] = {}

    @property
    def log_file(self) -> Path:
        return self.logs_dir / GATEWAY_LOG_FILE

    def start(self, gw: Gateway) -> None:
        self._gw = gw
        flt = ContextFilter("gateway")
        fh = file_handler(self.log_file, self.settings)
        fh.addFilter(flt)
        self._handlers = [fh]
        if self.console:
            ch = logging.StreamHandler(sys.stderr)
            ch.setFormatter(formatter(self.settings.encoding))
            ch.addFilter(flt)
            self._handlers.append(ch)
        for name in TREES:
            tree = logging.getLogger(name)
            self._saved[name] = (tree.level, tree.propagate)
            for h in self._handlers:
                tree.addHandler(h)
            tree.setLevel(self.settings.log_level)
            if self.console:
                tree.propagate = False  # our console handler replaces the root logger's
        self.apply(gw.config)
        gw.controller.replica_env = self.replica_env
        gw.controller.replica_output = self.replica_output

    def stop(self) -> None:
        if self.access is not None:
            if self._gw is not None and self.access in self._gw.proxy.observers:
                self._gw.proxy.observers.remove(self.access)
            self.access.close()
            self.access = None
        for name, (level, propagate) in self._saved.items():
            tree = logging.getLogger(name)
            for h in self._handlers:
                tree.removeHandler(h)
            tree.setLevel(level)
            tree.propagate = propagate
        for h in self._handlers:
            h.close()
        self._handlers = []
        self._saved = {}

    def apply(self, config: GatewayConfig) -> None:
        """Follow a new config's access-log settings: an application's or deployment's
        `logging_config` (the narrower wins) also governs the gateway's access lines."""
        self._access_levels = {}
        self._access_config = config
        wanted = not self.settings.disable_access_log or any(
            not replica_logging_config(config, a.name, d.name).disable_access_log
            for a in config.applications for d in a.deployments)
        gw = self._gw
        if gw is None:
            return
        if wanted and self.access is None:
            self.access = AccessLog(logging.getLogger(ACCESS), self._call_record)
            gw.proxy.observers.append(self.access)
        elif not wanted and self.access is not None:
            if self.access in gw.proxy.observers:
                gw.proxy.observers.remove(self.access)
            self.access.close()
            self.access = None

    def _access_level(self, app: str, deployment: str) -> int:
        """Lowest level of an access line kept for this deployment (above CRITICAL: none)."""
        key = (app, deployment)
        level = self._access_levels.get(key)
        if level is None:
            merged = replica_logging_config(self._access_config, app, deployment)
            if merged.disable_access_log:
                level = logging.CRITICAL + 1
            else:
                level = logging.getLevelName(merged.log_level or self.settings.log_level)
            if len(self._access_levels) < 4096:  # names come from calls: keep it bounded
                self._access_levels[key] = level
        return level

    def _call_record(self, rec: CallRecord) -> logging.LogRecord | None:
        level = logging.INFO if rec.code is grpc.StatusCode.OK else logging.WARNING
        if level < self._access_level(rec.application, rec.deployment):
            return None
        return access_record(
            logging.getLogger(ACCESS), method=rec.method, code=rec.code,
            latency_s=rec.latency_s, end_time=rec.start_time + rec.latency_s,
            request_id=rec.request_id, application=rec.application,
            deployment=rec.deployment, replica=rec.replica,
        )

    def replica_settings(self, app: str, deployment: str) -> LogSettings:
        config = self._gw.controller.config if self._gw is not None else self.config
        merged = replica_logging_config(config, app, deployment)
        # The gateway's directory unless the application or deployment names its own.
        own_dir = merged.logs_dir if merged.logs_dir != config.logging_config.logs_dir else None
        settings = resolve(merged, own_dir or self.logs_dir, self.env)
        # Replicas stream to the console only when there is one (a foreground `gateway run`).
        return replace(settings, stream_replica_logs=settings.stream_replica_logs and self.console)

    def replica_env(self, dep: DeploymentState, slot: ReplicaSlot) -> dict[str, str]:
        """Environment for a replica process: its resolved logging settings."""
        return {ENV_REPLICA_LOGGING: self.replica_settings(dep.app, dep.name).to_json()}

    def replica_output(self, slot: ReplicaSlot, line: bytes) -> None:
        """A line a replica wrote to its stdout/stderr pipe.

        With console streaming on that is the replica's own log stream: shown prefixed with
        where it came from, as Ray does. Otherwise it is output that bypassed the replica's
        logging (a crash before logging was set up, a C extension): kept in the gateway log.
        """
        text = line.decode("utf-8", "replace").rstrip("\n")
        if not text:
            return
        if self.console and self.replica_settings(slot.application,
                                                  slot.deployment).stream_replica_logs:
            prefix = escape(f"(ServeReplica:{slot.application}#{slot.deployment} pid={slot.pid})")
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"{prefix} {escape(text)}\n")
                sys.stderr.flush()
            return
        logging.getLogger("gateway.replica_output").info(
            "%s", text,
            extra={"application": slot.application, "deployment": slot.deployment,
                   "replica": slot.replica_id},
        )


# -- a replica process -------------------------------------------------------------------


class _LineWriter:
    """Stands in for sys.stdout/sys.stderr in a replica: each printed line becomes a record."""

    def __init__(self, logger: logging.Logger, level: int, fallback: TextIO | None) -> None:
        self._logger = logger
        self._level = level
        self._buf = ""
        self._fallback = fallback
        self._local = threading.local()

    def write(self, s: str) -> int:
        if getattr(self._local, "busy", False):  # logging itself failed and wrote to stderr
            return self._fallback.write(s) if self._fallback is not None else len(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._emit(line)
        return len(s)

    def _emit(self, line: str) -> None:
        self._local.busy = True
        try:
            self._logger.log(self._level, "%s", line)
        finally:
            self._local.busy = False

    def flush(self) -> None:
        if self._buf:
            line, self._buf = self._buf, ""
            self._emit(line)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self._fallback is None:
            raise OSError("no file descriptor")
        return self._fallback.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


class _NotAccess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.__dict__.get("access", False)


class ReplicaLogging:
    """Logging inside a replica process: its own file, optional console stream, access log."""

    def __init__(self, settings: LogSettings, application: str, deployment: str,
                 replica_id: str) -> None:
        self.settings = settings
        self.application = application
        self.deployment = deployment
        self.replica_id = replica_id
        self.log_file = replica_log_file(settings.logs_dir, replica_id)
        self.access: AccessLog | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReplicaLogging | None:
        raw = env.get(ENV_REPLICA_LOGGING)
        if not raw:
            return None
        try:
            settings = LogSettings.from_json(raw)
        except (ValueError, TypeError):
            return None
        return cls(settings, env.get("GATEWAY_APPLICATION", ""),
                   env.get("GATEWAY_DEPLOYMENT", ""), env.get("GATEWAY_REPLICA_ID", ""))

    def start(self) -> None:
        """Route the process's logging and prints to the replica's file (and the console)."""
        flt = ContextFilter("replica", self.application, self.deployment, self.replica_id)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        fh = file_handler(self.log_file, self.settings)
        fh.addFilter(flt)
        root.addHandler(fh)
        if self.settings.stream_replica_logs:
            # The real stderr is the pipe the gateway prints, prefixed, on its console.
            ch = logging.StreamHandler(sys.__stderr__)
            ch.setFormatter(TextFormatter())
            ch.addFilter(flt)
            ch.addFilter(_NotAccess())  # the gateway's console already has one line per call
            root.addHandler(ch)
        root.setLevel(self.settings.log_level)
        sys.stdout = _LineWriter(logging.getLogger("gateway.replica.stdout"), logging.INFO,
                                 sys.__stderr__)  # type: ignore[assignment]
        sys.stderr = _LineWriter(logging.getLogger("gateway.replica.stderr"), logging.ERROR,
                                 sys.__stderr__)  # type: ignore[assignment]
        if not self.settings.disable_access_log:
            self.access = AccessLog(logging.getLogger(ACCESS), self._to_record)

    def stop(self) -> None:
        if self.access is not None:
            self.access.close()
            self.access = None
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        for h in logging.getLogger().handlers:
            h.flush()

    def _to_record(self, item: tuple[str, grpc.StatusCode, float, float, str]) -> (
        logging.LogRecord | None
    ):
        method, code, latency_s, end_time, rid = item
        return access_record(
            logging.getLogger(ACCESS), method=method, code=code, latency_s=latency_s,
            end_time=end_time, request_id=rid, application=self.application,
            deployment=self.deployment, replica=self.replica_id,
        )

    def record_call(self, method: str, code: grpc.StatusCode, latency_s: float,
                    request_id: str) -> None:
        if self.access is not None:
            self.access((method, code, latency_s, time.time(), request_id))

    # Calls that arrive over the mux (gateway/mux.py) ---------------------------------

    def mux_on_call(self, method: str, ctx: Any, code: grpc.StatusCode, seconds: float) -> None:
        """`MuxServer.on_call`: one access line per call."""
        self.record_call(method, code, seconds, request_id_of(ctx.invocation_metadata()))

    def wrap_unary_handlers(self, handlers: dict[str, Any]) -> dict[str, Any]:
        """Handlers that set the call context, so the servicer's own logs carry the id."""
        return {path: _with_context(path, h) for path, h in handlers.items()}

    # Calls that arrive as plain gRPC calls (streams, or local_transport: grpc) --------

    def interceptor(self) -> grpc.aio.ServerInterceptor:  # type: ignore[type-arg]
        return _ReplicaInterceptor(self)


def request_id_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key in REQUEST_ID_KEYS:
            return str(value)
    return ""


def _with_context(path: str, handler: Any) -> Any:
    inner = handler.unary_unary
    if inner is None:
        return handler

    async def unary_unary(request: Any, context: Any) -> Any:
        token = _call.set(CallContext(request_id_of(context.invocation_metadata()), path))
        try:
            result = inner(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            _call.reset(token)

    return handler._replace(unary_unary=unary_unary)


def _code_of(exc: BaseException | None, context: Any) -> grpc.StatusCode:
    code = None
    with contextlib.suppress(Exception):
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio may report the raw enum value
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _ReplicaInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Sets the call context and writes the access line for plain gRPC calls to a replica."""

    def __init__(self, logging_: ReplicaLogging) -> None:
        self._logging = logging_

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or path.startswith(INTERNAL_PREFIXES):
            return handler
        return self._wrap(path, handler)

    def _wrap(self, path: str, h: Any) -> Any:
        rl = self._logging

        def begin(context: Any) -> tuple[contextvars.Token[CallContext | None], str, float]:
            rid = request_id_of(context.invocation_metadata())
            return _call.set(CallContext(rid, path)), rid, time.perf_counter()

        def end(token: contextvars.Token[CallContext | None], rid: str, t0: float,
                exc: BaseException | None, context: Any) -> None:
            _call.reset(token)
            rl.record_call(path, _code_of(exc, context), time.perf_counter() - t0, rid)

        if not h.response_streaming:
            inner = h.stream_unary if h.request_streaming else h.unary_unary
            make = (grpc.stream_unary_rpc_method_handler if h.request_streaming
                    else grpc.unary_unary_rpc_method_handler)

            if not inspect.iscoroutinefunction(inner):
                # A plain method stays plain, so grpc runs it on an executor thread with the
                # sync context (where abort() raises), as it would without this wrapper.
                def unary_sync(request: Any, context: Any) -> Any:
                    token, rid, t0 = begin(context)
                    exc: BaseException | None = None
                    try:
                        return inner(request, context)
                    except BaseException as e:
                        exc = e
                        raise
                    finally:
                        end(token, rid, t0, exc, context)

                return make(unary_sync, request_deserializer=h.request_deserializer,
                            response_serializer=h.response_serializer)

            async def unary(request: Any, context: Any) -> Any:
                token, rid, t0 = begin(context)
                exc: BaseException | None = None
                try:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(token, rid, t0, exc, context)

            return make(unary, request_deserializer=h.request_deserializer,
                        response_serializer=h.response_serializer)

        inner_s = h.stream_stream if h.request_streaming else h.unary_stream
        make_s = (grpc.stream_stream_rpc_method_handler if h.request_streaming
                  else grpc.unary_stream_rpc_method_handler)

        if not (inspect.iscoroutinefunction(inner_s) or inspect.isasyncgenfunction(inner_s)):
            # A plain generator: run on an executor thread as grpc.aio would, its abort() sent
            # in order after the messages before it (gateway/sync_stream.py).
            inner_s = functools.partial(sync_stream, inner_s)

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            token, rid, t0 = begin(context)
            exc: BaseException | None = None
            result: Any = None
            try:
                result = inner_s(request, context)
                if hasattr(result, "__aiter__"):
                    async for msg in result:
                        yield msg
                elif inspect.isawaitable(result):
                    await result  # a handler that writes with context.write()
            except BaseException as e:
                exc = e
                if isinstance(e, GeneratorExit) and hasattr(result, "aclose"):
                    # Closed mid-stream (cancelled): close the method's generator now, not
                    # whenever it is collected, so a plain one's thread stops at once.
                    await result.aclose()
                raise
            finally:
                end(token, rid, t0, exc, context)

        return make_s(stream, request_deserializer=h.request_deserializer,
                      response_serializer=h.response_serializer)


# -- memory profiling --------------------------------------------------------------------


def memory_profiling_enabled(env: Mapping[str, str]) -> bool:
    return env.get(ENV_MEMORY_PROFILING, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def memory_profiler(logs_dir: Path | str, name: str, env: Mapping[str, str]) -> Iterator[
    Path | None
]:
    """A memray Tracker writing `<logs_dir>/memray_<name>_<pid>.bin`, when switched on by
    GATEWAY_ENABLE_MEMORY_PROFILING (like RAY_SERVE_ENABLE_MEMORY_PROFILING)."""
    if not memory_profiling_enabled(env):
        yield None
        return
    try:
        import memray
    except ImportError:
        log.warning("%s is set but memray is not installed "
                    "(pip install 'grpc-observability-gateway[memray]')", ENV_MEMORY_PROFILING)
        yield None
        return
    path = _free_path(Path(logs_dir), f"memray_{safe_name(name)}_{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with memray.Tracker(str(path), follow_fork=False):
        log.info("memory profiling with memray into %s", path)
        yield path


def _free_path(folder: Path, stem: str) -> Path:
    """`<stem>.bin`, or `<stem>.<n>.bin` if taken: a container's gateway is PID 1 on every
    start, and memray will not overwrite the capture of an earlier run."""
    path = folder / f"{stem}.bin"
    n = 1
    while path.exists() and n < 10_000:
        path = folder / f"{stem}.{n}.bin"
        n += 1
    return path
