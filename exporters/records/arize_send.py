"""Sending records through the Arize SDK's futures without ever blocking on its queue.

The SDK's `log_stream` submits one POST to a `BoundedExecutor` inside a `requests_futures`
session; when that executor is full, `submit` blocks while holding the session's lock, which
the finishing workers need: a deadlock. So every send first takes one of our own slots (as
many as the SDK's queue bound plus its workers), and gives it back from the future's last done
callback, after the SDK's own: the SDK's queue then always has room and `log_stream` never
blocks. Every wait is bounded, and a record is sent again only once its earlier send is known
to have ended (answered, failed, or cancelled before it started): never twice at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from exporters.records.base import ExportResult

Send = Callable[[dict[str, Any]], "cf.Future[Any]"]
RETRY, DONE = "retry", "done"


class Sender:
    """Sends one round of records (kwargs of `log_stream`) and sorts the outcomes."""

    def __init__(self, send: Send, slots: int, stall_s: float) -> None:
        self._send = send
        self._slots = threading.BoundedSemaphore(slots)
        self._capacity = slots
        self._stall_s = stall_s
        """No answer at all for this long: the SDK is stuck; stop waiting for it."""
        self.deadline = math.inf
        """Past it (the gateway is stopping), nothing new is sent and nothing is waited for."""
        self.changed = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._late: dict[cf.Future[Any], dict[str, Any]] = {}
        """Sends given up on while still running: settled when they end (never re-sent before)."""

    # -- slots ----------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _released(self, fut: cf.Future[Any], done: queue.SimpleQueue[cf.Future[Any]]) -> None:
        # Added after the SDK's own callbacks, so its queue has room again when this runs.
        with self._lock:
            self._in_flight -= 1
        self._slots.release()
        done.put(fut)

    def past_deadline(self) -> bool:
        return time.monotonic() >= self.deadline

    # -- a round --------------------------------------------------------------------------------

    def round(self, todo: list[dict[str, Any]], res: ExportResult,
              classify: Callable[[cf.Future[Any], ExportResult], str],
              refused: Callable[[Exception, ExportResult], None]) -> list[dict[str, Any]]:
        """Send `todo` (at most `slots` at once) and wait for every answer; returns the records
        to try again. Past the deadline, what is unsent or unanswered is counted dropped."""
        done: queue.SimpleQueue[cf.Future[Any]] = queue.SimpleQueue()
        pending: dict[cf.Future[Any], dict[str, Any]] = {}
        retry: list[dict[str, Any]] = []
        i = 0
        last_answer = time.monotonic()
        while i < len(todo) or pending:
            while i < len(todo) and not self.past_deadline() and self._slots.acquire(False):
                kw = todo[i]
                i += 1
                try:
                    fut = self._send(kw)
                except Exception as e:  # the SDK's own validation, or a closed session
                    self._slots.release()
                    refused(e, res)
                    continue
                with self._lock:
                    self._in_flight += 1
                pending[fut] = kw
                fut.add_done_callback(lambda f: self._released(f, done))
            if self.past_deadline():
                res.dropped += len(todo) - i + self._abandon(pending)
                break
            if not pending:
                # Every slot is held by a send given up on earlier: wait for one, bounded.
                if not self._slots.acquire(timeout=min(self._stall_s, self._left())):
                    retry.extend(todo[i:])
                    res.error = res.error or "no answer from Arize"
                    break
                self._slots.release()
                continue
            try:
                fut = done.get(timeout=max(0.0, min(self._stall_s, self._left(), 0.25)))
            except queue.Empty:
                if time.monotonic() - last_answer >= self._stall_s:
                    # Stuck: what never started is safe to send again; what runs is set
                    # aside and settled when it ends, never sent a second time meanwhile.
                    retry.extend(todo[i:])
                    for f, kw in list(pending.items()):
                        if f.cancel():
                            retry.append(kw)
                        else:
                            self._late[f] = kw
                    pending.clear()
                    res.error = "no answer from Arize"
                    break
                continue
            last_answer = time.monotonic()
            kw_done = pending.pop(fut, None)
            if kw_done is not None and classify(fut, res) == RETRY:
                retry.append(kw_done)
        return retry

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic()) if self.deadline < math.inf else 3600.0

    def _abandon(self, pending: dict[cf.Future[Any], dict[str, Any]]) -> int:
        """Past the deadline: cancel what has not started; count all of it dropped."""
        n = 0
        for f in list(pending):
            f.cancel()
            n += 1
        pending.clear()
        return n

    def settle_late(self, res: ExportResult,
                    classify: Callable[[cf.Future[Any], ExportResult], str],
                    final: bool = False) -> list[dict[str, Any]]:
        """Count the set-aside sends that have ended; returns those to send again. Past the
        deadline (or when `final`), the ones still running are counted dropped."""
        if final:
            while self._late and not self.past_deadline() and self.deadline < math.inf:
                time.sleep(0.02)  # the gateway is stopping: give them until its deadline
        again = []
        for f, kw in list(self._late.items()):
            if f.done():
                del self._late[f]
                if classify(f, res) == RETRY:
                    again.append(kw)
            elif final or self.past_deadline():
                del self._late[f]
                f.cancel()
                res.dropped += 1
        return again

    @property
    def late(self) -> int:
        return len(self._late)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait (bounded) until no send is in flight."""
        end = time.monotonic() + timeout_s
        while self._in_flight > 0:
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.02))
        return True
