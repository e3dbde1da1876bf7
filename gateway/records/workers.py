"""One record exporter behind its own bounded queue and thread.

A slow or unreachable exporter drops (and counts) its own records and never holds up the others
or the calls. Stopping is bounded: what is queued goes out until the deadline, the rest is
counted dropped with reason `shutdown`, and an exporter still busy is told to give up.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exporters.records.base import Record, RecordExporter

log = logging.getLogger("gateway.records")

EXPORTER_DROP_REASONS = ("queue_full", "invalid", "shutdown", "exporter_unavailable")
RECENT_RECORDS = 5
"""Why an exporter dropped records (each exported as 0 from the start)."""


@dataclass
class ExporterStats:
    """Health of one exporter, as plain counters (read by the metrics and by tests)."""

    exported: int = 0
    failed: int = 0
    retries: int = 0
    dropped: dict[str, int] = field(
        default_factory=lambda: collections.defaultdict(int, dict.fromkeys(EXPORTER_DROP_REASONS,
                                                                           0)))
    """By reason: queue_full, invalid, shutdown, exporter_unavailable."""
    last_error: str = ""
    """The exporter's own words on its last failed batch (it never quotes a key)."""
    last_error_at: float = 0.0
    recent: collections.deque[Record] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_RECORDS))
    """The last records handed to the exporter (the dashboard shows them)."""


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
                    break  # stopping, nothing left
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
                    self._cond.notify_all()
                    break
                n = min(self.batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                self._busy = n
            self._export(batch)
            with self._cond:
                self._busy = 0
                self._cond.notify_all()
        if self.exporter.outstanding():
            self._export([])  # settle sends whose outcome came late (or count them dropped)

    def _export(self, batch: list[Record]) -> None:
        assert self.exporter is not None
        try:
            res = self.exporter.export(batch)
        except Exception as e:  # a plug-in broke its contract: count, never propagate
            self.stats.failed += len(batch)
            self.stats.last_error = f"the exporter raised {type(e).__name__}"
            self.stats.last_error_at = time.time()
            self._log_once(f"raise:{type(e).__name__}",
                           "record exporter %s raised %s; counting its failures", self.name,
                           type(e).__name__)
            return
        st = self.stats
        st.recent.extend(batch[-RECENT_RECORDS:])
        st.exported += res.exported
        st.failed += res.failed
        st.retries += res.retries
        if res.invalid:
            st.dropped["invalid"] += res.invalid
        if res.dropped:
            st.dropped["shutdown"] += res.dropped
        if res.failed or res.error:
            st.last_error = res.error or f"{res.failed} record(s) failed"
            st.last_error_at = time.time()
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
        """Send what is queued until `deadline` (monotonic), drop the rest (counted
        `shutdown`), shut the exporter. Returns by about the deadline plus half a second."""
        with self._cond:
            self._stopping = True
            self._deadline = deadline
            self._cond.notify_all()
        if self.exporter is not None:
            try:
                self.exporter.begin_shutdown(deadline)
            except Exception:
                log.warning("record exporter %s failed to begin its shutdown", self.name)
        alive = False
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive() and self.exporter is not None:
                # Still in export at the deadline: tell it to give up now.
                try:
                    self.exporter.shutdown(0)
                except Exception:
                    log.warning("record exporter %s failed to shut down", self.name)
                self._thread.join(0.5)
            alive = self._thread.is_alive()
            if alive:
                log.warning("record exporter %s did not stop in time; leaving it", self.name)
        with self._cond:
            if self._queue:
                self.stats.dropped["shutdown"] += len(self._queue)
                self._queue.clear()
        if self.exporter is not None and not alive:
            try:
                self.exporter.shutdown(max(0.0, deadline - time.monotonic()) * 1000)
            except Exception:
                log.warning("record exporter %s failed to shut down", self.name)
