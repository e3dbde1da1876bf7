"""The prediction record pipeline: sampled calls -> decoded records -> record exporters.

On the call path only two things happen: `Plan.capture` decides whether a call is sampled
(a set lookup and a random number), and `observe` keeps a reference to the finished call's
request and response bytes in a bounded intake queue (an append, or a counted drop); a
streaming call keeps its messages in a bounded `StreamCapture`. One worker thread decodes
(gateway/records/decode.py) and hands the records to each exporter once (exporter_set.py,
workers.py: its own bounded queue and thread). Counters are plain numbers on the pipeline (`stats`,
`calls_dropped`) and, with metrics on, OpenTelemetry observable instruments read them at
collection time; every documented drop reason is there, as 0, from the start.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from exporters.records.base import MAX_PREDICTION_ID
from gateway.config import GatewayConfig
from gateway.dataplane.call import CallRecord
from gateway.dataplane.routing import AppRoute
from gateway.records.actuals import ActualsFileError, actual_records, read_actuals_csv
from gateway.records.capture import STREAM_DROP_REASONS, Budget, StreamCapture
from gateway.records.decode import (
    LOSS_REASONS,
    MAX_COLUMNS,
    MAX_ROWS_PER_CALL,
    OIP_INFER,
    CallInfo,
    Decoder,
    Plan,
)
from gateway.records.exporter_set import ExporterSet
from gateway.records.instruments import register_metrics
from gateway.records.tensors import DecodeProblem, tensor_values
from gateway.records.workers import EXPORTER_DROP_REASONS, ExporterStats, ExporterWorker

if TYPE_CHECKING:
    from google.protobuf.descriptor import FileDescriptor
    from opentelemetry.metrics import MeterProvider

    from gateway.dataplane.methods import MethodTable

__all__ = [
    "CALL_DROP_REASONS", "EXPORTER_DROP_REASONS", "MAX_COLUMNS", "MAX_PREDICTION_ID",
    "MAX_ROWS_PER_CALL", "OIP_INFER", "ActualsFileError", "CallInfo", "DecodeProblem",
    "ExporterStats", "ExporterWorker", "RecordPipeline", "read_actuals_csv",
    "tensor_values",
]

log = logging.getLogger("gateway.records")

CALL_DROP_REASONS = ("queue_full", "decode_error", "mapper_error", "not_served", *LOSS_REASONS,
                     *STREAM_DROP_REASONS)
"""Why sampled calls (or parts of them) made no record, as `exporter=""` series: calls for
queue_full, decode_error, mapper_error, not_served (refused by the gateway itself) and
no_rows; records for too_many_rows; tensors for tensor_skipped; payloads (the record is kept,
tagged) for payload_too_large and, for streams, too_many_messages and capture_budget."""

_Item = tuple[Plan, CallRecord, "tuple[list[bytes], list[bytes]] | None", "str | None"]


class RecordPipeline:
    """Build with the gateway's config; `observe` goes on `proxy.observers`."""

    def __init__(self, config: GatewayConfig, logs_dir: Path,
                 methods: MethodTable | None = None) -> None:
        self.config = config
        self.logs_dir = logs_dir
        rc = config.records
        self.exporters = ExporterSet(config, logs_dir)
        self.workers = self.exporters.workers
        self.stats = self.exporters.stats
        """Per exporter name: exported, failed, retries, dropped by reason."""
        self.calls_sampled = 0
        self.calls_dropped: dict[str, int] = collections.defaultdict(
            int, dict.fromkeys(CALL_DROP_REASONS, 0))
        """Sampled calls (or parts) that made no record, by reason (see CALL_DROP_REASONS)."""
        self.records_built = 0
        self.decoder = Decoder(methods)
        self.decoder.losses = self.calls_dropped
        self._budget = Budget()
        self._routes: dict[str, AppRoute] = {}
        self._intake: collections.deque[_Item] = collections.deque()
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
        self._plans = self._build_plans(config)

    @property
    def methods(self) -> MethodTable | None:
        return self.decoder.methods

    @methods.setter
    def methods(self, table: MethodTable | None) -> None:
        self.decoder.methods = table

    # -- config --------------------------------------------------------------------------------

    def _build_plans(self, config: GatewayConfig) -> dict[str, Plan]:
        plans = {}
        for app in config.applications:
            cfg = app.prediction_records
            if not cfg.enabled:
                continue
            try:
                plans[app.name] = Plan(app.name, cfg, list(dict.fromkeys(cfg.exporters)))
            except Exception as e:
                log.error("application %r: prediction records are off: %s: %s", app.name,
                          type(e).__name__, e)
        return plans

    def apply(self, config: GatewayConfig) -> None:
        """A new goal state: per-application settings change now; exporters are kept (one
        named for the first time is built by the worker on its first record; changed exporter
        settings need a restart)."""
        self.config = config
        self.exporters.config = config
        self._plans = self._build_plans(config)
        self.bind_routes(self._routes)

    def bind_routes(self, routes: Mapping[str, AppRoute]) -> None:
        """Give each application's route its sampling decisions (call on every routes change)."""
        self._routes = dict(routes)
        for name, route in routes.items():
            plan = self._plans.get(name)
            route.capture = plan.capture if plan is not None else None
            route.stream_capture = self._stream_capture(plan) if plan is not None else None

    def _stream_capture(self, plan: Plan) -> Callable[[str], StreamCapture | None]:
        def start(path: str) -> StreamCapture | None:
            if not plan.capture(path):
                return None
            return StreamCapture(self._observe_stream, plan.cap, self._budget)
        return start

    def learn_files(self, files: Iterable[FileDescriptor]) -> None:
        """The current descriptors (config sources and reflection), so their messages can be
        decoded: replaces what an earlier call gave (see Decoder.set_pools)."""
        self.decoder.set_pools(fd.pool for fd in files)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the exporters the config uses and start the decode worker (blocking: may
        import an exporter's SDK; run it off the event loop)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for plan in self._plans.values():
            self.exporters.targets(plan)
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
        """Decode what is queued, give the exporters until the timeout to send, stop. Returns
        within the timeout plus about half a second: what could not go out is counted dropped
        with reason `shutdown`."""
        if timeout_s is None:
            timeout_s = self.config.records.shutdown_timeout_s
        deadline = time.monotonic() + timeout_s
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(max(0.0, deadline - time.monotonic()))
        workers = list({id(w): w for w in self.workers.values()}.values())
        stoppers = [threading.Thread(target=w.stop, args=(deadline,), daemon=True)
                    for w in workers]
        for t in stoppers:  # side by side: one slow exporter does not eat another's grace
            t.start()
        for t in stoppers:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)

    # -- the call path -------------------------------------------------------------------------

    def observe(self, rec: CallRecord) -> None:
        """Proxy observer: queue a sampled unary call (an append, or a counted drop)."""
        if rec.request is None:
            return
        plan = self._plans.get(rec.application)
        if plan is None:
            return
        self.calls_sampled += 1
        if self._not_served(rec):
            return
        note = None
        if len(rec.request) > plan.cap or (rec.response is not None
                                           and len(rec.response) > plan.cap):
            # The record is kept without its payload, and says so.
            self.calls_dropped["payload_too_large"] += 1
            big = "request" if len(rec.request) > plan.cap else "response"
            note = f"{big} larger than max_payload_bytes"
            rec = dataclasses.replace(rec, request=None, response=None)
        self._enqueue(plan, rec, None, note)

    def _observe_stream(self, rec: CallRecord, stream: tuple[list[bytes], list[bytes]] | None,
                        note: str | None, reason: str = "payload_too_large") -> None:
        """A sampled streaming call ended (from its `StreamCapture`)."""
        plan = self._plans.get(rec.application)
        if plan is None:
            return
        self.calls_sampled += 1
        if self._not_served(rec):
            return
        if note is not None:
            # payload_too_large, too_many_messages or capture_budget (see StreamCapture._keep)
            self.calls_dropped[reason or "payload_too_large"] += 1
        self._enqueue(plan, rec, stream, note)

    def _not_served(self, rec: CallRecord) -> bool:
        """A call the gateway refused before any replica had it (no replica, replica not
        reachable, queue full, draining, bad metadata): no prediction to record, and a client
        retrying it with the same request id would give Arize two records for one id. Counted,
        not recorded. (A gateway bug, INTERNAL, may come after a replica answered: kept.)"""
        if rec.gateway_error and (not rec.replica or rec.code is not grpc.StatusCode.INTERNAL):
            self.calls_dropped["not_served"] += 1
            return True
        return False

    def _enqueue(self, plan: Plan, rec: CallRecord,
                 stream: tuple[list[bytes], list[bytes]] | None, note: str | None) -> None:
        if len(self._intake) >= self._intake_max:
            self.calls_dropped["queue_full"] += 1
            return
        intake = self._intake
        intake.append((plan, rec, stream, note))
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
            plan, rec, stream, note = intake.popleft()
            records = self._decode_one(plan, rec, stream, note)
            if not records:
                continue
            self.records_built += len(records)
            for w in self.exporters.targets(plan):
                w.offer(records)

    def _decode_one(self, plan: Plan, rec: CallRecord,
                    stream: tuple[list[bytes], list[bytes]] | None,
                    note: str | None) -> list[Any]:
        try:
            return self.decoder.decode(plan, rec, stream, note)
        except DecodeProblem as e:
            self.calls_dropped["decode_error"] += 1
            self._log_once(f"decode:{plan.app}:{e}", "application %r: call %s made no "
                           "record: %s", plan.app, rec.request_id, e)
        except (ValueError, TypeError, KeyError, AttributeError, DecodeError) as e:
            # DecodeError is no ValueError: without it, a payload that does not parse was
            # counted (and logged) as a mapper failure.
            reason = "decode_error" if (plan.mapper is None or isinstance(e, DecodeError)) \
                else "mapper_error"
            self.calls_dropped[reason] += 1
            self._log_once(f"{reason}:{plan.app}:{type(e).__name__}",
                           "application %r: call %s made no record: %s: %s",
                           plan.app, rec.request_id, type(e).__name__, e)
        except Exception as e:
            self.calls_dropped["mapper_error"] += 1
            self._log_once(f"mapper:{plan.app}:{type(e).__name__}",
                           "application %r: the record mapper failed: %s: %s", plan.app,
                           type(e).__name__, e)
        return []

    def _decode(self, plan: Plan, rec: CallRecord) -> list[Any]:
        """One unary call's records (raises what the decoder raises; for tests)."""
        return self.decoder.decode(plan, rec)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged and len(self._logged) < 200:
            self._logged.add(key)
            log.warning(msg, *args)

    # -- delayed actuals -----------------------------------------------------------------------

    def log_actuals(self, application: str, actuals: Sequence[Any]) -> tuple[int, int, str]:
        """Queue ground truth for earlier predictions of `application` to its exporters.

        Each item has `prediction_id` and `actual_label` and/or `actual_score` (the admin
        RPC's `Actual`, or any object or mapping with those). The model name is the one its
        predictions used (`model_name` from the config, else the application). Returns
        (accepted, rejected, message). Blocking (may build an exporter): call it off the
        event loop."""
        plan = self._plans.get(application)
        if plan is None:
            have = ", ".join(sorted(self._plans)) or "none"
            return 0, len(actuals), (f"application {application!r} has no prediction records "
                                     f"(applications with records: {have})")
        model = plan.model
        records, why = actual_records(plan, actuals)
        accepted = len(records)
        if records:
            if not self._started:
                self.start()
            for w in self.exporters.targets(plan):
                accepted = min(accepted, w.offer(records))
            if accepted < len(records):
                why["exporter queue full"] += len(records) - accepted
        rejected = len(actuals) - accepted
        if records:
            names = ", ".join(dict.fromkeys(w.name for w in self.exporters.targets(plan)))
        else:
            names = ", ".join(dict.fromkeys(self.exporters.resolve_name(n)
                                            for n in plan.exporters))
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
                for name, s in list(self.stats.items())
            },
        }

    def register_metrics(self, provider: MeterProvider) -> None:
        """Exporter health as OpenTelemetry observable instruments (read at collection)."""
        register_metrics(provider, self.stats, self.workers, self.calls_dropped,
                         lambda: len(self._intake))
