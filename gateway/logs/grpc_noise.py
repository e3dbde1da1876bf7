"""grpc's own log lines that a client can trigger at will, condensed.

grpc's Cython layer logs at ERROR, with a traceback: `Invalid encoding on b'...'` each time
a call's metadata is read and a value is not UTF-8 (bytes under a key without `-bin`),
twice per call; and `Unexpected [DecodeError] raised by servicer method` for each request to
a service the gateway answers itself (health, reflection, Ray's API) that does not parse. A
client sending such calls in a loop would flood the logs. The filter drops those lines and
says, at most once per WINDOW_S, how many there were (without the values: the client's
bytes).
"""

from __future__ import annotations

import logging
import threading
import time

WINDOW_S = 60.0
_LOGGER = "grpc._cython.cygrpc"


class InvalidEncodingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.suppressed = 0
        """Lines dropped since the start (a figure for tests and status)."""
        self._pending = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if not (msg.startswith("Invalid encoding on") or "[DecodeError]" in msg):
            return True
        with self._lock:
            self.suppressed += 1
            self._pending += 1
            now = time.monotonic()
            if now - self._last < WINDOW_S:
                return False
            count, self._pending, self._last = self._pending, 0, now
        # Rewritten in place: same logger and handlers, no traceback, no client bytes.
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = ("calls with metadata that is not UTF-8 under keys without '-bin', or "
                      "requests that do not parse as the method's message (%d line(s) of "
                      "grpc's condensed; at most one such line per %gs)")
        record.args = (count, WINDOW_S)
        record.exc_info = record.exc_text = None
        return True


_installed: InvalidEncodingFilter | None = None


def install() -> InvalidEncodingFilter:
    """Install the filter once per process; returns it."""
    global _installed
    if _installed is None:
        _installed = InvalidEncodingFilter()
        logging.getLogger(_LOGGER).addFilter(_installed)
    return _installed
