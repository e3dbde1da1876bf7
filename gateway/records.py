"""The prediction record pipeline: sampled calls -> decoded records -> record exporters.

On the call path only two things happen: `AppRoute.capture` decides whether a call is sampled
(a set lookup and a random number), and `observe` keeps a reference to the finished call's
request and response bytes in a bounded intake queue (an append, or a counted drop). One worker
thread decodes with the compiled message classes and builds records:

- Open Inference Protocol (`inference.GRPCInferenceService/ModelInfer`), built in: one record
  per row of the batch, features from the input tensors (typed or raw contents), label and score
  from the outputs;
- any other proto: a field mapping from the config, or a user function `module:function`.

Each exporter gets its own bounded queue and thread, so a slow or unreachable exporter drops
(and counts) its own records and never holds up the others or the calls. Counters are plain
numbers on the pipeline (`stats`, `calls_dropped`) and, with metrics on, OpenTelemetry
observable instruments read them at collection time.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
import logging
import math
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

from exporters import registry
from exporters.base import (
    ActualRecord,
    ExporterContext,
    PredictionRecord,
    Record,
    RecordExporter,
)
from gateway.config import FieldMapping, GatewayConfig, PredictionRecordsConfig
from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.proxy import AppRoute, CallRecord

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from gateway.methods import MethodTable

log = logging.getLogger("gateway.records")

OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_PREDICTION_ID = 512
MAX_ROWS_PER_CALL = 10_000
"""Rows of one batched call that become records; the rest are dropped (and counted)."""
MAX_COLUMNS = 1_000
"""Columns of one tensor (or one repeated field) that become features."""
OK = grpc.StatusCode.OK


# -- exporter workers ------------------------------------------------------------------------


@dataclass
class ExporterStats:
    """Health of one exporter, as plain counters (read by the metrics and by tests)."""

    exported: int = 0
    failed: int = 0
    retries: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """By reason: queue_full, invalid, shutdown, exporter_unavailable."""
    queue_depth: int = 0


class ExporterWorker:
    """One exporter behind its own bounded queue and thread."""

    def __init__(self, name: str, exporter: RecordExporter | None, queue_size: int,
                 batch_size: int, flush_interval_s: float) -> None:
        self.name = name
        self.exporter = exporter
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.stats = ExporterStats()
        self._queue: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._flushing = 0
        self._stopping = False
        self._deadline = math.inf
        self._logged: set[str] = set()
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return len(self._queue) + self._busy

    def start(self) -> None:
        if self.exporter is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"records-{self.name}",
                                            daemon=True)
            self._thread.start()

    def offer(self, records: Sequence[Record]) -> int:
        """Queue what fits; the rest is dropped and counted. Returns how many were queued."""
        with self._cond:
            if self.exporter is None:
                self.stats.dropped["exporter_unavailable"] += len(records)
                return 0
            if self._stopping:
                self.stats.dropped["shutdown"] += len(records)
                return 0
            was_empty = not self._queue
            room = max(0, self.queue_size - len(self._queue))
            taken = records[:room] if len(records) > room else records
            self._queue.extend(taken)
            if len(taken) < len(records):
                self.stats.dropped["queue_full"] += len(records) - len(taken)
            self.stats.queue_depth = len(self._queue)
            # Wake the exporter for a first record or a full batch, not for every record: it
            # waits for the batch to fill (at most flush_interval_s) anyway.
            if was_empty or len(self._queue) >= self.batch_size:
                self._cond.notify_all()
        return len(taken)

    def _run(self) -> None:
        assert self.exporter is not None
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, nothing left
                # Let a batch fill, but never keep a record longer than the interval.
                end = time.monotonic() + self.flush_interval_s
                while (len(self._queue) < self.batch_size and not self._stopping
                       and not self._flushing):
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping and time.monotonic() > self._deadline:
                    self.stats.dropped["shutdown"] += len(self._queue)
                    self._queue.clear()
                    self.stats.queue_depth = 0
                    self._cond.notify_all()
                    return
                n = min(self.batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                self._busy = n
                self.stats.queue_depth = len(self._queue)
            self._export(batch)
            with self._cond:
                self._busy = 0
                self._cond.notify_all()

    def _export(self, batch: list[Record]) -> None:
        assert self.exporter is not None
        try:
            res = self.exporter.export(batch)
        except Exception as e:  # a plug-in broke its contract: count, never propagate
            self.stats.failed += len(batch)
            self._log_once(f"raise:{type(e).__name__}",
                           "record exporter %s raised %s; counting its failures", self.name,
                           type(e).__name__)
            return
        st = self.stats
        st.exported += res.exported
        st.failed += res.failed
        st.retries += res.retries
        if res.invalid:
            st.dropped["invalid"] += res.invalid
        if res.failed:
            # Exporters log their own failures (once); this is for debugging the pipeline.
            log.debug("record exporter %s: %d record(s) failed (%s)", self.name, res.failed,
                      res.error or "no reason given")

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged and len(self._logged) < 100:
            self._logged.add(key)
            log.warning(msg, *args)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued has been handed to the exporter; True if it was."""
        end = time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._queue or self._busy:
                    left = end - time.monotonic()
                    if left <= 0 or (self._thread is None or not self._thread.is_alive()):
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._flushing -= 1
        if self.exporter is not None:
            return self.exporter.force_flush(max(0.0, end - time.monotonic()) * 1000)
        return True

    def stop(self, deadline: float) -> None:
        """Send what is queued until `deadline` (monotonic), drop the rest, shut the exporter."""
        with self._cond:
            self._stopping = True
            self._deadline = deadline
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + 0.5)
            if self._thread.is_alive() and self.exporter is not None:
                # Stuck in export (e.g. backing off): tell it to give up, then wait a little.
                self.exporter.shutdown(0)
                self._thread.join(2.0)
        with self._cond:
            if self._queue:
                self.stats.dropped["shutdown"] += len(self._queue)
                self._queue.clear()
            self.stats.queue_depth = 0
        if self.exporter is not None:
            try:
                self.exporter.shutdown(max(0.0, deadline - time.monotonic()) * 1000)
            except Exception:
                log.warning("record exporter %s failed to shut down", self.name)


# -- decoding --------------------------------------------------------------------------------

_TYPED = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_RAW = {
    "BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B",
    "UINT16": "H", "UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d",
}


class DecodeProblem(ValueError):
    """A payload that could not be turned into records; the message says why."""


def _short_float(x: float) -> float:
    """An FP32/FP16 value as the shortest double that reads back the same (5.1, not 5.0999...)."""
    return float(f"{x:.7g}") if math.isfinite(x) else x


def tensor_values(name: str, datatype: str, shape: Sequence[int], contents: Any,
                  raw: bytes | None) -> list[Any]:
    """The flat values of an Open Inference tensor, from raw or typed contents."""
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    values: list[Any]
    if raw is not None:
        if datatype == "BYTES":
            values, pos = [], 0
            while pos + 4 <= len(raw):
                (size,) = struct.unpack_from("<I", raw, pos)
                values.append(raw[pos + 4 : pos + 4 + size])
                pos += 4 + size
            if pos != len(raw):
                raise DecodeProblem(f"tensor {name!r}: raw BYTES contents are malformed")
        else:
            fmt = _RAW.get(datatype)
            if fmt is None:
                raise DecodeProblem(f"tensor {name!r}: unknown datatype {datatype!r}")
            size = struct.calcsize(fmt)
            if len(raw) != n * size:
                raise DecodeProblem(f"tensor {name!r}: {len(raw)} raw bytes for shape "
                                    f"{list(shape)} of {datatype}")
            values = list(struct.unpack(f"<{n}{fmt}", raw))
    else:
        attr = _TYPED.get(datatype)
        if attr is None:
            raise DecodeProblem(f"tensor {name!r}: datatype {datatype!r} needs raw contents")
        values = list(getattr(contents, attr))
    if len(values) != n:
        raise DecodeProblem(f"tensor {name!r}: {len(values)} values for shape {list(shape)}")
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in values]
    if datatype in ("FP32", "FP16"):
        return [_short_float(v) for v in values]
    return values


@dataclass
class _Tensor:
    name: str
    rows: int
    per_row: int
    values: list[Any]

    def row(self, i: int) -> list[Any]:
        return self.values[i * self.per_row : (i + 1) * self.per_row]


def _tensors(items: Sequence[Any], raw: Sequence[bytes]) -> list[_Tensor]:
    out = []
    for i, t in enumerate(items):
        shape = list(t.shape)
        values = tensor_values(t.name, t.datatype, shape, t.contents,
                               raw[i] if i < len(raw) else None)
        rows = shape[0] if shape else 1
        per_row = len(values) // rows if rows else 0
        out.append(_Tensor(t.name, rows, per_row, values))
    return out


@dataclass(frozen=True)
class CallInfo:
    """The facts of one call, handed to a user mapping function with the decoded messages."""

    application: str
    deployment: str
    replica: str
    method: str
    status_code: str
    details: str
    latency_ms: float
    timestamp: int
    request_id: str
    tags: dict[str, str | bool | int | float]
    """The tags the gateway puts on every record of this call."""


def _path_value(msg: Message, path: str) -> Any:
    cur: Any = msg
    for part in path.split("."):
        if not isinstance(cur, Message):
            raise DecodeProblem(f"field path {path!r}: {part!r} is inside a non-message value")
        fd = cur.DESCRIPTOR.fields_by_name.get(part)
        if fd is None:
            raise DecodeProblem(f"field path {path!r}: {cur.DESCRIPTOR.full_name} has no field "
                                f"{part!r}")
        value = getattr(cur, part)
        enum = fd.enum_type if fd.type == FieldDescriptor.TYPE_ENUM else None
        if enum is not None:
            names = {v.number: v.name for v in enum.values}
            if isinstance(value, int):
                value = names.get(value, value)
            else:  # repeated
                value = [names.get(v, v) for v in value]
        cur = value
    return cur


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return json.dumps(MessageToDict(value, preserving_proto_field_name=True),
                          sort_keys=True)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return _short_float(value)
    return value


def _add_feature(out: dict[str, Any], name: str, value: Any) -> None:
    if isinstance(value, Mapping) or hasattr(value, "items"):
        out[name] = json.dumps({str(k): _plain(v) for k, v in value.items()}, sort_keys=True,
                               default=str)
    elif isinstance(value, str | bytes | bool | int | float | Message):
        out[name] = _plain(value)
    else:  # repeated
        items = [_plain(v) for v in list(value)[:MAX_COLUMNS]]
        if all(isinstance(v, str) for v in items):
            out[name] = items
        else:
            for i, v in enumerate(items):
                out[f"{name}_{i}"] = v


# -- the pipeline ----------------------------------------------------------------------------


class _Plan:
    """How one application's calls become records (rebuilt when its config changes)."""

    def __init__(self, app: str, cfg: PredictionRecordsConfig, exporters: list[str]) -> None:
        self.app = app
        self.cfg = cfg
        self.exporters = exporters
        self.mapper: Callable[..., Any] | None = None
        if cfg.mapper:
            module, _, attr = cfg.mapper.partition(":")
            fn = getattr(importlib.import_module(module), attr, None)
            if not callable(fn):
                raise ValueError(f"mapper {cfg.mapper!r} is not a callable")
            self.mapper = fn
        methods = cfg.methods
        if methods is None and self.mapper is None and cfg.field_mapping is None:
            methods = [OIP_INFER]
        self.methods = frozenset(methods) if methods is not None else None
        self.rate = cfg.sample_rate
        self.cap = cfg.max_payload_bytes

    def capture(self, path: str) -> bool:
        if self.methods is not None and path not in self.methods:
            return False
        return self.rate >= 1.0 or random.random() < self.rate


class RecordPipeline:
    """Build with the gateway's config; `observe` goes on `proxy.observers`."""

    def __init__(self, config: GatewayConfig, logs_dir: Path,
                 methods: MethodTable | None = None) -> None:
        self.config = config
        self.logs_dir = logs_dir
        self.methods = methods
        rc = config.records
        self.workers: dict[str, ExporterWorker] = {}
        self.stats: dict[str, ExporterStats] = {}
        """Per exporter name: exported, failed, retries, dropped by reason, queue depth."""
        self.calls_sampled = 0
        self.calls_dropped: dict[str, int] = collections.defaultdict(int)
        """Sampled calls that made no record, by reason: queue_full, payload_too_large,
        decode_error, mapper_error."""
        self.records_built = 0
        self._plans: dict[str, _Plan] = {}
        self._routes: dict[str, AppRoute] = {}
        self._intake: collections.deque[tuple[_Plan, CallRecord]] = collections.deque()
        self._intake_max = rc.queue_size
        self._wake_at = max(1, rc.queue_size // 4)
        self.poll_interval_s = 0.05
        """How often the decode worker looks for sampled calls when nobody woke it."""
        self._wake = threading.Event()
        self._idle = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = False
        self._logged: set[str] = set()
        self._classes: dict[str, type[Message]] = {}
        self._pools: list[Any] = [descriptor_pool.Default()]
        self._seen_models: dict[str, str] = {}
        self._plans = self._build_plans(config)

    # -- config --------------------------------------------------------------------------------

    def _build_plans(self, config: GatewayConfig) -> dict[str, _Plan]:
        plans = {}
        for app in config.applications:
            cfg = app.prediction_records
            if not cfg.enabled:
                continue
            try:
                plans[app.name] = _Plan(app.name, cfg, list(dict.fromkeys(cfg.exporters)))
            except Exception as e:
                log.error("application %r: prediction records are off: %s: %s", app.name,
                          type(e).__name__, e)
        return plans

    def apply(self, config: GatewayConfig) -> None:
        """A new goal state: per-application settings change now; exporters are kept (one
        named for the first time is built by the worker on its first record; changed exporter
        settings need a restart)."""
        self.config = config
        self._plans = self._build_plans(config)
        self.bind_routes(self._routes)

    def bind_routes(self, routes: Mapping[str, AppRoute]) -> None:
        """Give each application's route its sampling decision (call on every routes change)."""
        self._routes = dict(routes)
        for name, route in routes.items():
            plan = self._plans.get(name)
            route.capture = plan.capture if plan is not None else None

    def learn_files(self, files: Iterable[FileDescriptor]) -> None:
        """Descriptors learned through reflection, so their messages can be decoded."""
        for fd in files:
            if fd.pool not in self._pools:
                self._pools.append(fd.pool)

    # -- exporters -----------------------------------------------------------------------------

    def _arize_settings(self) -> dict[str, Any]:
        a = self.config.records.arize
        return {
            "api_key": a.api_key.get_secret_value() if a.api_key else None,
            "space_id": a.space_id.get_secret_value() if a.space_id else None,
            "api_scheme": a.api_scheme, "api_host": a.api_host, "api_port": a.api_port,
            "timeout_s": a.timeout_s, "max_retries": a.max_retries,
            "backoff_initial_s": a.backoff_initial_s, "backoff_max_s": a.backoff_max_s,
            "max_workers": a.max_workers,
        }

    def _jsonl_settings(self) -> dict[str, Any]:
        path = self.config.records.jsonl_path
        return {"path": path or str(self.logs_dir / "records.jsonl")}

    @property
    def arize_keys_set(self) -> bool:
        a = self.config.records.arize
        return bool(a.api_key and a.api_key.get_secret_value()
                    and a.space_id and a.space_id.get_secret_value())

    def _resolve_name(self, name: str) -> str:
        if name == "default":
            return "arize" if self.arize_keys_set else "jsonl"
        return name

    def _build(self, name: str) -> tuple[RecordExporter | None, int]:
        rc = self.config.records
        entry = next((e for e in rc.exporters if e.name == name), None)
        type_name = entry.type if entry is not None else name
        options = entry.options if entry is not None else {}
        queue_size = entry.queue_size if entry is not None else rc.queue_size
        settings: dict[str, Any] = {}
        if type_name == "arize":
            settings = self._arize_settings()
        elif type_name == "jsonl":
            settings = self._jsonl_settings()
        try:
            cls = registry.resolve(type_name)
            exporter = cls(options, ExporterContext(logs_dir=self.logs_dir, settings=settings))
        except Exception as e:
            log.error("record exporter %r (%s) is unavailable: %s: %s", name, type_name,
                      type(e).__name__, e)
            return None, queue_size
        return exporter, queue_size

    def _worker(self, name: str) -> ExporterWorker:
        """The worker for exporter `name` ("default" resolved), built and started on first use."""
        name = self._resolve_name(name)
        w = self.workers.get(name)
        if w is not None:
            return w
        with self._lock:
            w = self.workers.get(name)
            if w is not None:
                return w
            exporter, queue_size = self._build(name)
            if exporter is None and name == "arize" and "arize" not in {
                e.name for e in self.config.records.exporters
            } and self.arize_keys_set:
                log.warning("records go to the JSONL file instead")
                return self._jsonl_fallback()
            rc = self.config.records
            w = ExporterWorker(name, exporter, queue_size, rc.batch_size, rc.flush_interval_s)
            self.stats[name] = w.stats
            self.workers[name] = w
            w.start()
            if exporter is not None:
                where = getattr(exporter, "endpoint", None) or getattr(exporter, "path", "")
                log.info("prediction records: exporter %r ready%s", name,
                         f" ({where})" if where else "")
            return w

    def _jsonl_fallback(self) -> ExporterWorker:
        existing = self.workers.get("jsonl")
        if existing is not None:
            self.workers["arize"] = existing
            return existing
        exporter, queue_size = self._build("jsonl")
        rc = self.config.records
        w = ExporterWorker("jsonl", exporter, queue_size, rc.batch_size, rc.flush_interval_s)
        self.stats["jsonl"] = w.stats
        self.workers["arize"] = self.workers["jsonl"] = w
        w.start()
        return w

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the exporters the config uses and start the decode worker (blocking: may
        import an exporter's SDK; run it off the event loop)."""
        if self._started:
            return
        self._started = True
        for plan in self._plans.values():
            for name in plan.exporters:
                self._worker(name)
        self._thread = threading.Thread(target=self._run, name="records-decode", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Decode everything queued and hand it to the exporters; True when all went out."""
        end = time.monotonic() + timeout_s
        self._wake.set()
        while self._intake or not self._idle:
            if time.monotonic() > end or self._thread is None or not self._thread.is_alive():
                return False
            self._wake.set()
            time.sleep(0.01)
        ok = True
        for w in set(self.workers.values()):
            ok = w.flush(max(0.0, end - time.monotonic())) and ok
        return ok

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Decode what is queued, give the exporters until the timeout to send, stop."""
        if timeout_s is None:
            timeout_s = self.config.records.shutdown_timeout_s
        deadline = time.monotonic() + timeout_s
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(max(0.0, deadline - time.monotonic()) + 0.5)
        for w in set(self.workers.values()):
            w.stop(deadline)

    # -- the call path -------------------------------------------------------------------------

    def observe(self, rec: CallRecord) -> None:
        """Proxy observer: queue a sampled call (an append, or a counted drop)."""
        if rec.request is None:
            return
        plan = self._plans.get(rec.application)
        if plan is None:
            return
        self.calls_sampled += 1
        if len(rec.request) > plan.cap or (rec.response is not None
                                           and len(rec.response) > plan.cap):
            self.calls_dropped["payload_too_large"] += 1
            return
        if len(self._intake) >= self._intake_max:
            self.calls_dropped["queue_full"] += 1
            return
        intake = self._intake
        intake.append((plan, rec))
        # The worker polls; waking it per call would hand the GIL back and forth per call
        # (measured: ~200 us of gateway CPU per call at 100% sampling). Only a filling queue
        # wakes it early.
        if self._idle and len(intake) >= self._wake_at:
            self._wake.set()

    # -- the decode worker ---------------------------------------------------------------------

    def _run(self) -> None:
        intake = self._intake
        while True:
            if not intake:
                self._idle = True
                if self._stop.is_set():
                    return
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
                continue
            self._idle = False
            plan, rec = intake.popleft()
            try:
                records = self._decode(plan, rec)
            except DecodeProblem as e:
                self.calls_dropped["decode_error"] += 1
                self._log_once(f"decode:{plan.app}:{e}", "application %r: call %s made no "
                               "record: %s", plan.app, rec.request_id, e)
                continue
            except (DecodeError, ValueError, TypeError, KeyError, AttributeError) as e:
                self.calls_dropped["decode_error"] += 1
                self._log_once(f"decode:{plan.app}:{type(e).__name__}",
                               "application %r: call %s could not be decoded: %s: %s",
                               plan.app, rec.request_id, type(e).__name__, e)
                continue
            except Exception as e:
                self.calls_dropped["mapper_error"] += 1
                self._log_once(f"mapper:{plan.app}:{type(e).__name__}",
                               "application %r: the record mapper failed: %s: %s", plan.app,
                               type(e).__name__, e)
                continue
            if not records:
                continue
            self.records_built += len(records)
            for name in plan.exporters:
                self._worker(name).offer(records)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged and len(self._logged) < 200:
            self._logged.add(key)
            log.warning(msg, *args)

    def _message_class(self, full_name: str) -> type[Message]:
        cls = self._classes.get(full_name)
        if cls is None:
            desc: Descriptor | None = None
            for pool in self._pools:
                try:
                    desc = pool.FindMessageTypeByName(full_name)
                    break
                except KeyError:
                    continue
            if desc is None:
                raise DecodeProblem(f"message type {full_name!r} is unknown (add its module to "
                                    "proto_modules)")
            cls = self._classes[full_name] = message_factory.GetMessageClass(desc)
        return cls

    @staticmethod
    def _tags(rec: CallRecord) -> dict[str, str | bool | int | float]:
        tags: dict[str, str | bool | int | float] = {
            "application": rec.application,
            "deployment": rec.deployment,
            "replica": rec.replica,
            "method": rec.method,
            "status_code": rec.code.name,
            "latency_ms": round(rec.latency_s * 1000.0, 3),
            "request_id": rec.request_id,
        }
        if rec.code is not OK and rec.details:
            tags["status_details"] = rec.details[:500]
        return tags

    @staticmethod
    def _pid(base: str, row: int | None) -> str:
        pid = base if row is None else f"{base}:{row}"
        if len(pid) > MAX_PREDICTION_ID:
            digest = hashlib.sha256(base.encode()).hexdigest()
            pid = digest if row is None else f"{digest}:{row}"
        return pid

    def _decode(self, plan: _Plan, rec: CallRecord) -> list[PredictionRecord]:
        if plan.mapper is not None:
            return self._decode_user(plan, rec)
        if rec.method == OIP_INFER and (plan.cfg.field_mapping is None
                                        or plan.cfg.field_mapping.request_type is None):
            return self._decode_oip(plan, rec)
        if plan.cfg.field_mapping is not None:
            return self._decode_mapped(plan, rec, plan.cfg.field_mapping)
        return []

    def _types(self, rec: CallRecord, mapping: FieldMapping | None) -> tuple[str, str]:
        info = self.methods.get(rec.method) if self.methods is not None else None
        req = mapping.request_type if mapping and mapping.request_type else None
        resp = mapping.response_type if mapping and mapping.response_type else None
        req = req or (info.input_type if info is not None else None)
        resp = resp or (info.output_type if info is not None else None)
        if req is None or resp is None:
            raise DecodeProblem(f"method {rec.method} is unknown: set field_mapping.request_type"
                                " and response_type, or add its module to proto_modules")
        return req, resp

    def _model(self, plan: _Plan, *names: str) -> str:
        name = plan.cfg.model_name or next((n for n in names if n), "") or plan.app
        self._seen_models[plan.app] = name
        return name

    def _record(self, plan: _Plan, rec: CallRecord, **kw: Any) -> PredictionRecord:
        kw.setdefault("prediction_id", rec.request_id)
        kw.setdefault("model_name", self._model(plan))
        kw.setdefault("model_version", plan.cfg.model_version)
        kw.setdefault("prediction_timestamp", int(rec.start_time))
        kw.setdefault("tags", self._tags(rec))
        return PredictionRecord(model_type=plan.cfg.model_type,
                                environment=plan.cfg.environment,
                                application=plan.app, **kw)

    def _decode_oip(self, plan: _Plan, rec: CallRecord) -> list[PredictionRecord]:
        assert rec.request is not None
        req = oip.ModelInferRequest.FromString(rec.request)
        resp = None
        if rec.code is OK and rec.response is not None:
            resp = oip.ModelInferResponse.FromString(rec.response)
        mapping = plan.cfg.field_mapping
        wanted = set(mapping.features) if mapping is not None and mapping.features else None
        columns = mapping.column_names if mapping is not None else {}
        inputs = [t for t in _tensors(req.inputs, req.raw_input_contents)
                  if wanted is None or t.name in wanted]
        outputs = _tensors(resp.outputs, resp.raw_output_contents) if resp is not None else []
        rows = inputs[0].rows if inputs else (outputs[0].rows if outputs else 1)
        label_t, score_t = self._oip_outputs(outputs, mapping, rows)
        model = self._model(plan, req.model_name, resp.model_name if resp is not None else "")
        version = plan.cfg.model_version or req.model_version or (
            resp.model_version if resp is not None else "") or None
        base = f"{rec.request_id}:{req.id}" if req.id else rec.request_id
        ts = int(rec.start_time)
        out = []
        if rows > MAX_ROWS_PER_CALL:
            self.calls_dropped["too_many_rows"] += 1
            rows = MAX_ROWS_PER_CALL
        for i in range(max(rows, 0)):
            feats: dict[str, Any] = {}
            for t in inputs:
                if t.rows != rows:
                    continue
                vals = t.row(i)[:MAX_COLUMNS]
                names = columns.get(t.name)
                if t.per_row == 1 and not names:
                    feats[t.name] = vals[0]
                else:
                    for j, v in enumerate(vals):
                        feats[names[j] if names and j < len(names) else f"{t.name}_{j}"] = v
            label: Any = None
            score: float | None = None
            if label_t is not None:
                label = label_t.row(i)[0]
            if score_t is not None:
                row = score_t.row(i)
                nums = [float(v) for v in row]
                best = max(range(len(nums)), key=nums.__getitem__)
                score = nums[best]
                if label is None and len(nums) > 1:
                    label = str(best)  # class probabilities: the label is the best class index
            tags = self._tags(rec)
            if req.id:
                tags["infer_id"] = req.id
            if rows > 1:
                tags["row"] = i
            out.append(self._record(
                plan, rec, prediction_id=self._pid(base, i if rows > 1 else None),
                model_name=model, model_version=version, prediction_timestamp=ts,
                prediction_label=label, prediction_score=score, features=feats, tags=tags,
            ))
        return out

    @staticmethod
    def _oip_outputs(outputs: list[_Tensor], mapping: FieldMapping | None,
                     rows: int) -> tuple[_Tensor | None, _Tensor | None]:
        by_name = {t.name: t for t in outputs if t.rows == rows and t.per_row >= 1}
        label = score = None
        if mapping is not None and mapping.prediction_label:
            label = by_name.get(mapping.prediction_label)
        if mapping is not None and mapping.prediction_score:
            score = by_name.get(mapping.prediction_score)
        if label is None and (mapping is None or not mapping.prediction_label):
            label = next((by_name[n] for n in ("label", "labels", "class", "prediction",
                                               "predictions") if n in by_name), None)
            if label is None:
                label = next((t for t in by_name.values()
                              if t.values and isinstance(t.values[0], str)), None)
        if score is None and (mapping is None or not mapping.prediction_score):
            score = next((by_name[n] for n in ("score", "scores", "probability",
                                               "probabilities", "confidence") if n in by_name),
                         None)
            if score is None:
                score = next((t for t in by_name.values() if t is not label and t.values
                              and isinstance(t.values[0], float)), None)
        if label is not None and label.per_row != 1:
            label = None
        return label, score

    def _decode_mapped(self, plan: _Plan, rec: CallRecord,
                       mapping: FieldMapping) -> list[PredictionRecord]:
        assert rec.request is not None
        req_type, resp_type = self._types(rec, mapping)
        req = self._message_class(req_type).FromString(rec.request)
        feats: dict[str, Any] = {}
        for path in mapping.features:
            _add_feature(feats, path, _path_value(req, path))
        label: Any = None
        score: float | None = None
        if rec.code is OK and rec.response is not None:
            resp = self._message_class(resp_type).FromString(rec.response)
            if mapping.prediction_label:
                label = _plain(_path_value(resp, mapping.prediction_label))
            if mapping.prediction_score:
                score = float(_path_value(resp, mapping.prediction_score))
        return [self._record(plan, rec, prediction_label=label, prediction_score=score,
                             features=feats)]

    def _decode_user(self, plan: _Plan, rec: CallRecord) -> list[PredictionRecord]:
        assert plan.mapper is not None and rec.request is not None
        request: Any = rec.request
        response: Any = rec.response
        try:
            req_type, resp_type = self._types(rec, plan.cfg.field_mapping)
        except DecodeProblem:
            pass  # unknown method: the function gets the bytes
        else:
            request = self._message_class(req_type).FromString(rec.request)
            if rec.response is not None and rec.code is OK:
                response = self._message_class(resp_type).FromString(rec.response)
        tags = self._tags(rec)
        info = CallInfo(rec.application, rec.deployment, rec.replica, rec.method,
                        rec.code.name, rec.details, round(rec.latency_s * 1000.0, 3),
                        int(rec.start_time), rec.request_id, dict(tags))
        result = plan.mapper(request, response, info)
        if result is None:
            return []
        if isinstance(result, PredictionRecord | Mapping):
            result = [result]
        allowed = {f.name for f in fields(PredictionRecord)}
        out = []
        for item in result:
            data = item.to_dict() if isinstance(item, PredictionRecord) else dict(item)
            data.pop("kind", None)
            unknown = set(data) - allowed
            if unknown:
                raise TypeError(f"record fields {sorted(unknown)} are unknown")
            data["tags"] = {**tags, **(data.get("tags") or {})}
            data = {k: v for k, v in data.items() if v is not None}
            data.pop("model_type", None)
            data.pop("environment", None)
            data.pop("application", None)
            if "prediction_timestamp" in data:
                data["prediction_timestamp"] = int(data["prediction_timestamp"])
            if "prediction_id" in data:
                data["prediction_id"] = self._pid(str(data["prediction_id"]), None)
            out.append(self._record(plan, rec, **data))
        return out

    # -- delayed actuals -----------------------------------------------------------------------

    def log_actuals(self, application: str, actuals: Sequence[Any]) -> tuple[int, int, str]:
        """Queue ground truth for earlier predictions of `application` to its exporters.

        Each item has `prediction_id` and `actual_label` and/or `actual_score` (the admin
        RPC's `Actual`, or any object or mapping with those). Returns (accepted, rejected,
        message)."""
        plan = self._plans.get(application)
        if plan is None:
            have = ", ".join(sorted(self._plans)) or "none"
            return 0, len(actuals), (f"application {application!r} has no prediction records "
                                     f"(applications with records: {have})")
        model_type = plan.cfg.model_type
        numeric = model_type in ("NUMERIC", "REGRESSION")
        model = plan.cfg.model_name or self._seen_models.get(application) or application
        records: list[Record] = []
        why: collections.Counter[str] = collections.Counter()
        for a in actuals:
            get = a.get if isinstance(a, Mapping) else (lambda k, _a=a: getattr(_a, k, None))
            pid = str(get("prediction_id") or "").strip()
            label = get("actual_label") or None
            score = get("actual_score")
            if hasattr(a, "HasField") and not a.HasField("actual_score"):
                score = None
            if not pid or len(pid) > MAX_PREDICTION_ID:
                why["prediction id empty or longer than 512"] += 1
                continue
            if label is None and score is None:
                why["no actual label or score"] += 1
                continue
            if numeric and score is None:
                try:
                    score = float(label)  # type: ignore[arg-type]
                except ValueError:
                    why[f"{model_type} model needs a numeric actual"] += 1
                    continue
            records.append(ActualRecord(
                prediction_id=pid, model_name=model, model_type=model_type,
                environment=plan.cfg.environment, actual_label=label,
                actual_score=None if score is None else float(score), application=application,
            ))
        accepted = len(records)
        if records:
            if not self._started:
                self.start()
            for name in plan.exporters:
                accepted = min(accepted, self._worker(name).offer(records))
            if accepted < len(records):
                why["exporter queue full"] += len(records) - accepted
        rejected = len(actuals) - accepted
        names = ", ".join(dict.fromkeys(self._resolve_name(n) for n in plan.exporters))
        msg = f"{accepted} actual(s) queued for model {model!r} ({names})"
        if why:
            msg += "; rejected: " + "; ".join(f"{n} {w}" for w, n in why.most_common())
        return accepted, rejected, msg

    # -- metrics -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """All counters as plain data."""
        return {
            "calls_sampled": self.calls_sampled,
            "calls_dropped": dict(self.calls_dropped),
            "intake_depth": len(self._intake),
            "records_built": self.records_built,
            "exporters": {
                name: {"exported": s.exported, "failed": s.failed, "retries": s.retries,
                       "dropped": dict(s.dropped), "queue_depth": self.workers[name].depth}
                for name, s in self.stats.items()
            },
        }

    def register_metrics(self, provider: MeterProvider) -> None:
        """Exporter health as OpenTelemetry observable instruments (read at collection)."""
        from opentelemetry.metrics import Observation

        meter = provider.get_meter("grpc_gateway.records", "0.1.0")

        def per_exporter(value: Callable[[ExporterStats, ExporterWorker], int]) -> Callable[
            [Any], list[Observation]
        ]:
            def cb(_options: Any) -> list[Observation]:
                return [Observation(value(self.stats[n], w), {"exporter": n})
                        for n, w in list(self.workers.items()) if n in self.stats]
            return cb

        def dropped(_options: Any) -> list[Observation]:
            out = [Observation(v, {"exporter": n, "reason": r})
                   for n, s in list(self.stats.items()) for r, v in list(s.dropped.items())]
            out += [Observation(v, {"exporter": "", "reason": r})
                    for r, v in list(self.calls_dropped.items())]
            return out

        meter.create_observable_counter(
            "grpc_gateway_records_exported", [per_exporter(lambda s, w: s.exported)],
            description="Prediction records (and actuals) an exporter delivered.")
        meter.create_observable_counter(
            "grpc_gateway_records_failed", [per_exporter(lambda s, w: s.failed)],
            description="Records an exporter could not deliver (refused, or retries ran out).")
        meter.create_observable_counter(
            "grpc_gateway_records_retries", [per_exporter(lambda s, w: s.retries)],
            description="Extra delivery attempts of records (connection errors, 429, 5xx).")
        meter.create_observable_counter(
            "grpc_gateway_records_dropped", [dropped],
            description="Records (exporter set) or sampled calls (exporter empty) dropped, by "
                        "reason.")
        meter.create_observable_gauge(
            "grpc_gateway_records_queue_depth", [per_exporter(lambda s, w: w.depth)],
            description="Records waiting in an exporter's queue.")

        def intake(_options: Any) -> list[Observation]:
            return [Observation(len(self._intake), {})]

        meter.create_observable_gauge(
            "grpc_gateway_records_intake_depth", [intake],
            description="Sampled calls waiting to be decoded into records.")


def attach(gateway: Any) -> RecordPipeline:
    """Build the pipeline of `gateway` and hook it to the proxy (and to the metrics)."""
    cfg: GatewayConfig = gateway.config
    logs_dir = gateway.logs_dir or Path(cfg.logging_config.logs_dir or "logs")
    pipeline = RecordPipeline(cfg, Path(logs_dir), gateway.methods)
    gateway.proxy.observers.append(pipeline.observe)
    telemetry = getattr(gateway, "telemetry", None)
    if telemetry is not None:
        pipeline.register_metrics(telemetry.provider)
    return pipeline



# -- actuals from a CSV file (`gateway actuals`) ---------------------------------------------


class ActualsFileError(ValueError):
    """A CSV of actuals that cannot be used; the message names the file and line."""


def read_actuals_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of `prediction_id,actual` (a header line is optional) as `Actual` fields: the text
    is the actual label, and also the actual score when it is a number."""
    import csv

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ActualsFileError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ActualsFileError(f"{p}: not a UTF-8 text file") from None
    out: list[dict[str, Any]] = []
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if n == 1 and row[0].strip().lower() == "prediction_id":
            continue
        if len(row) != 2:
            raise ActualsFileError(f"{p}: line {n}: want 2 columns (prediction_id,actual), "
                                   f"got {len(row)}")
        pid, actual = row[0].strip(), row[1].strip()
        if not pid:
            raise ActualsFileError(f"{p}: line {n}: empty prediction_id")
        if not actual:
            raise ActualsFileError(f"{p}: line {n}: empty actual")
        item: dict[str, Any] = {"prediction_id": pid, "actual_label": actual}
        try:
            score = float(actual)
        except ValueError:
            pass
        else:
            if math.isfinite(score):
                item["actual_score"] = score
        out.append(item)
    return out
