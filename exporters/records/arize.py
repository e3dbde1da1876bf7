"""Prediction records and actuals to Arize, through the real `arize` SDK (`ml.log_stream`).

The SDK sends one HTTP POST per record from its own thread pool and gives back a future. It
neither retries nor times out by default, and blocks its caller when its pool's queue is full
(`arize_send.Sender` never lets it: see there); so this exporter (already on its own thread
behind a bounded queue) sends one batch at a time, bounds each POST in all (`arize_deadline`:
the SDK's timeout bounds each read only), and retries connection
errors, 429 and 5xx with exponential backoff up to a bound; a record is sent again only once its
earlier send has ended. Other 4xx answers (a wrong key, a refused record) are not retried:
counted as failed and logged once per status. Records are shaped to pass the SDK's validation
first (prediction id length, float scores, reserved tag names, whole-second timestamps), so a
bad value costs one record, never the batch.

`import arize` is slow (pandas, pyarrow) and attaches a stdout log handler unless
`ARIZE_LOG_ENABLE=false`: it happens only when this exporter is built. The API key and space
id are held here and handed to the SDK only; they are scrubbed from anything this module logs
or returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from exporters.records import arize_deadline
from exporters.records.arize_send import DONE, RETRY, Sender
from exporters.records.base import (
    MAX_PREDICTION_ID,
    ActualRecord,
    ExporterContext,
    ExportResult,
    PredictionRecord,
    Record,
    RecordExporter,
)

log = logging.getLogger("exporters.arize")

MAX_TAG_CHARS = 1000
"""The SDK warns on every record above this (and refuses above 20,000): cut here, quietly."""
RESERVED_TAGS = frozenset(
    {"total_token_count", "prompt_token_count", "response_token_count", "response_latency_ms"}
)
"""Tag names the SDK reserves for LLM run metadata (it raises on them): renamed `gateway_<name>`."""
CATEGORICAL = frozenset({"SCORE_CATEGORICAL", "BINARY_CLASSIFICATION"})
NUMERIC = frozenset({"NUMERIC", "REGRESSION"})
SUPPORTED_MODEL_TYPES = CATEGORICAL | NUMERIC


class InvalidRecord(ValueError):
    """A record that Arize's validation would refuse; the message says why."""


def safe_prediction_id(pid: str) -> str:
    """A prediction id Arize accepts (1..512 chars): longer ids become their SHA-256."""
    pid = pid.strip()
    if not pid:
        raise InvalidRecord("empty prediction id")
    if len(pid) > MAX_PREDICTION_ID:
        return hashlib.sha256(pid.encode()).hexdigest()
    return pid


def _name(key: Any) -> str:
    name = str(key)
    if name.endswith("_shap"):
        name += "_"  # the SDK refuses names with this suffix (it marks SHAP values)
    return name


def safe_tags(tags: Mapping[str, Any]) -> dict[str, str | bool | int | float]:
    out: dict[str, str | bool | int | float] = {}
    for key, value in tags.items():
        name = _name(key)
        if name in RESERVED_TAGS:
            name = f"gateway_{name}"
        if value is None:
            continue
        if isinstance(value, float | int | bool):
            out[name] = value
        else:
            out[name] = str(value)[:MAX_TAG_CHARS]
    return out


def safe_features(features: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in features.items():
        if value is None:
            continue
        if isinstance(value, list):
            out[_name(key)] = [str(v) for v in value]
        elif isinstance(value, str | bool | int | float):
            out[_name(key)] = value
        else:
            out[_name(key)] = str(value)
    return out


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def prediction_label(rec: PredictionRecord) -> Any:
    """The `prediction_label` argument for the record's model type (scores always floats)."""
    score = None if rec.prediction_score is None else float(rec.prediction_score)
    label = rec.prediction_label
    if rec.model_type in NUMERIC:
        value = score if score is not None else _float(label)
        if value is None:
            raise InvalidRecord(f"{rec.model_type} model: no numeric prediction")
        return value
    if label is not None and not isinstance(label, bool):
        label = str(label)
    if label is not None and score is not None:
        return (label, score)
    if label is not None:
        return label
    if score is not None:
        return score
    status = rec.tags.get("status_code")
    if status not in (None, "OK") or (status and "payload_dropped" in rec.tags):
        # A failed call (or one whose payload was too large to keep) has no prediction: its
        # status stands in, so it still shows up.
        return str(status)
    raise InvalidRecord("no prediction label or score")


def actual_label(rec: ActualRecord) -> Any:
    if rec.model_type in NUMERIC:
        value = rec.actual_score if rec.actual_score is not None else _float(rec.actual_label)
        if value is None:
            raise InvalidRecord(f"{rec.model_type} model: actual is not a number")
        return float(value)
    if rec.actual_label is not None and rec.actual_label != "":
        return rec.actual_label
    if rec.actual_score is not None:
        return float(rec.actual_score)
    raise InvalidRecord("no actual label or score")


class ArizeExporter(RecordExporter):
    """Settings (from `records.arize`, resolved at start-up; options may override the
    non-secret ones): api_key, space_id, api_scheme, api_host, api_port, timeout_s,
    max_retries, backoff_initial_s, backoff_max_s, max_workers."""

    name = "arize"

    def __init__(self, options: Mapping[str, Any], context: ExporterContext) -> None:
        super().__init__(options, context)
        s = {**context.settings, **{k: v for k, v in self.options.items()
                                    if k not in ("api_key", "space_id")}}
        key, space = context.settings.get("api_key"), context.settings.get("space_id")
        if not key or not space:
            raise ValueError("the Arize exporter needs an API key and a space id "
                             "(ARIZE_API_KEY and ARIZE_SPACE_ID, or records.arize)")
        self._key: str = str(key)
        self._space: str = str(space)
        self.timeout_s = float(s.get("timeout_s") or 10.0)
        self.max_retries = int(s.get("max_retries", 5))
        self.backoff_initial_s = float(s.get("backoff_initial_s") or 0.5)
        self.backoff_max_s = float(s.get("backoff_max_s") or 30.0)
        workers = int(s.get("max_workers") or 4)
        endpoint = {k: s[k] for k in ("api_scheme", "api_host", "api_port") if s.get(k)}
        self.endpoint = "{}://{}{}".format(
            endpoint.get("api_scheme", "https"), endpoint.get("api_host", "api.arize.com"),
            f":{endpoint['api_port']}" if endpoint.get("api_port") else "")
        self._stopping = threading.Event()
        self._retry_after = 0.0
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()
        # Must precede the import: the SDK configures its logging at import time.
        os.environ.setdefault("ARIZE_LOG_ENABLE", "false")
        from arize import ArizeClient
        from arize.ml.types import Environments, ModelTypes

        self._model_types = ModelTypes
        self._environments = Environments
        try:
            bound = max(workers * 4, 16)
            self._client = ArizeClient(
                api_key=self._key, stream_max_workers=workers,
                stream_max_queue_bound=bound, enable_caching=False, **endpoint,
            )
        except Exception as e:
            raise ValueError(f"cannot set up the Arize client: {self.scrub(str(e))}") from None
        # Each POST ends within timeout_s in all (the SDK's timeout bounds each read only).
        self._watchdog: arize_deadline.Watchdog | None = None
        ensure = getattr(self._client.ml, "_ensure_session", None)
        try:
            if ensure is not None:
                self._watchdog = arize_deadline.install(ensure(), self.timeout_s)
        except Exception as e:
            log.warning("Arize exporter: no overall deadline per request (%s): a send may "
                        "hang as long as its receiver trickles", type(e).__name__)
        # As many sends at once as the SDK's queue holds: its submit then never blocks.
        self._sender = Sender(self._send, bound + workers, stall_s=2 * self.timeout_s + 1)
        # Where records really go (the SDK also honours ARIZE_API_SCHEME/HOST/PORT).
        url = getattr(getattr(self._client, "sdk_config", None), "records_url", None)
        if isinstance(url, str):
            self.endpoint = url.removesuffix("/v1/log")

    # -- helpers ------------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """`text` with the key and the space id masked (for anything logged or returned)."""
        for secret in (self._key, self._space):
            if len(secret) >= 6:  # shorter ones are no real keys and would mangle the text
                text = text.replace(secret, "***")
        return text

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        with self._warn_lock:
            if what in self._warned:
                return
            self._warned.add(what)
        log.warning(self.scrub(message % args if args else message))

    def _kwargs(self, rec: Record) -> dict[str, Any]:
        try:
            common: dict[str, Any] = {
                "space_id": self._space,
                "model_name": rec.model_name,
                "model_type": self._model_types[rec.model_type],
                "environment": self._environments[rec.environment],
                "prediction_id": safe_prediction_id(rec.prediction_id),
                "timeout": self.timeout_s,
            }
        except KeyError as e:
            raise InvalidRecord(f"unknown model type or environment {e}") from None
        if not rec.model_name:
            raise InvalidRecord("no model name")
        if isinstance(rec, ActualRecord):
            # `tags={}`: the SDK builds an actual only from a truthy label or with tags, and
            # a numeric actual of 0 is a real one.
            return {**common, "actual_label": actual_label(rec), "tags": {}}
        if rec.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidRecord(f"model type {rec.model_type} is not supported by the gateway")
        return {
            **common,
            "model_version": rec.model_version or None,
            "prediction_timestamp": int(rec.prediction_timestamp),
            "prediction_label": prediction_label(rec),
            "features": safe_features(rec.features) or None,
            "tags": safe_tags(rec.tags) or None,
        }

    def _send(self, kwargs: dict[str, Any]) -> cf.Future[Any]:
        future: cf.Future[Any] = self._client.ml.log_stream(**kwargs)
        return future

    def _classify(self, fut: cf.Future[Any], res: ExportResult) -> str:
        """Count one ended send; RETRY when it may be sent again (it is over either way)."""
        if fut.cancelled():
            return RETRY  # never started
        try:
            resp = fut.result(0)
        except Exception as e:  # connection refused, reset, timed out
            res.error = type(e).__name__
            return RETRY
        status = int(resp.status_code)
        if 200 <= status < 300:
            res.exported += 1
            return DONE
        res.error = f"HTTP {status}"
        if status == 429 or status >= 500:
            ra = _float(resp.headers.get("retry-after"))
            if ra is not None:
                self._retry_after = max(self._retry_after, ra)
            return RETRY
        res.failed += 1
        self._warn_once(f"http:{status}", "Arize at %s answered HTTP %d: not retried (records "
                        "counted as failed; logged once)", self.endpoint, status)
        return DONE

    def _refused(self, e: Exception, res: ExportResult) -> None:
        if isinstance(e, RuntimeError) and (self._stopping.is_set()
                                            or "after" in str(e)):
            res.dropped += 1  # the session is closed: the gateway is stopping
            return
        res.invalid += 1
        self._warn_once(f"sdk:{type(e).__name__}", "the Arize SDK refused a record: %s: %s",
                        type(e).__name__, str(e))

    # -- RecordExporter -----------------------------------------------------------------------

    def export(self, batch: Sequence[Record]) -> ExportResult:
        res = ExportResult()
        sender = self._sender
        pending = sender.settle_late(res, self._classify)  # ended since: count, maybe resend
        for rec in batch:
            try:
                pending.append(self._kwargs(rec))
            except (InvalidRecord, TypeError, ValueError) as e:
                res.invalid += 1
                self._warn_once(f"invalid:{type(e).__name__}",
                                "Arize record refused before sending (%s); counting further "
                                "ones quietly", self.scrub(str(e)))
        attempt = 0
        while pending:
            self._retry_after = 0.0
            retry = sender.round(pending, res, self._classify, self._refused)
            if not retry:
                break
            if attempt >= self.max_retries:
                res.failed += len(retry)
                self._warn_once(f"gaveup:{res.error}",
                                "Arize at %s: %d record(s) not sent after %d attempt(s) (%s)",
                                self.endpoint, len(retry), attempt + 1, res.error)
                break
            delay = min(self.backoff_max_s, self.backoff_initial_s * (2 ** attempt))
            delay = min(self.backoff_max_s, max(delay * random.uniform(0.5, 1.0),
                                                self._retry_after))
            if not self._backoff(delay):
                res.dropped += len(retry)  # the gateway stops before the next attempt
                break
            attempt += 1
            res.retries += len(retry)
            pending = retry
        if sender.deadline < math.inf and sender.late:  # stopping: settle, never resend now
            again = sender.settle_late(res, self._classify, final=True)  # counts the stuck
            res.dropped += len(again)  # ended but not sent again: the gateway stops
        if res.error:
            res.error = self.scrub(res.error)
        return res

    def _backoff(self, delay: float) -> bool:
        """Sleep `delay` unless the gateway stops before it ends: False then."""
        end = time.monotonic() + delay
        while True:
            if end > self._sender.deadline:
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._sender.changed.wait(left)
            self._sender.changed.clear()

    def outstanding(self) -> int:
        return self._sender.late

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        return self._sender.wait_idle(timeout_millis / 1000.0) and not self._sender.late

    def begin_shutdown(self, deadline: float) -> None:
        self._sender.deadline = min(self._sender.deadline, deadline)
        self._sender.changed.set()

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        """Bounded: sends still running get until the timeout, queued ones are cancelled,
        and the SDK's threads are told to stop without waiting for them."""
        self._stopping.set()
        self.begin_shutdown(time.monotonic() + timeout_millis / 1000.0)
        idle = self._sender.wait_idle(timeout_millis / 1000.0)
        if self._watchdog is not None:
            # Sends still running fail now: the SDK's threads end and the process can exit.
            self._watchdog.abort_all()
            idle = self._sender.wait_idle(1.0)
        session = getattr(self._client.ml, "_session", None)
        if session is None:
            return
        try:
            inner = getattr(session.executor, "executor", session.executor)
            inner.shutdown(wait=False, cancel_futures=True)
            if idle:  # closing waits for running requests: only when there are none
                session.close()
        except Exception:
            pass
