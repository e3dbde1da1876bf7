"""Log files that cannot be written (disk full, a read-only or vanished logs_dir).

The stdlib's `Handler.handleError` prints a traceback to stderr for every record that fails:
on a full disk, one per log line, forever. Here each (file, reason) is said once on stderr,
every later failure is only counted. The
caller (the call path included) never sees the error: calls go on without their log lines.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

FAILURES: dict[str, int] = {}
"""Log records lost, by reason (`ENOSPC`, `EACCES`, `EROFS`, ...), since the start."""
_failing: set[str] = set()
_lock = threading.Lock()


def _reason() -> str:
    exc = sys.exc_info()[1]
    errno = getattr(exc, "errno", None)
    if errno is not None:
        import errno as errno_mod

        return errno_mod.errorcode.get(errno, str(errno))
    return type(exc).__name__ if exc is not None else "unknown"


def report(handler: logging.Handler, record: logging.LogRecord) -> None:
    """`handleError` for file handlers: once on stderr per file and reason, then counted."""
    reason = _reason()
    path = str(getattr(handler, "baseFilename", handler))
    with _lock:
        FAILURES[reason] = FAILURES.get(reason, 0) + 1
        key = f"{path}\0{reason}"
        first = key not in _failing
        _failing.add(key)
    if first:
        exc = sys.exc_info()[1]
        why = getattr(exc, "strerror", None) or reason
        err = sys.__stderr__
        if err is None:
            return
        try:
            err.write(f"gateway: cannot write the log file {path}: {why}; log "
                                 "lines are dropped (and counted) while it fails\n")
            err.flush()
        except (OSError, ValueError, AttributeError):
            pass


def total() -> int:
    with _lock:
        return sum(FAILURES.values())


def register_metrics(provider: Any) -> None:
    """`grpc_gateway_log_lines_dropped{reason}`: log records lost to unwritable files."""
    from opentelemetry.metrics import CallbackOptions, Observation

    def observe(_options: CallbackOptions) -> list[Observation]:
        with _lock:
            return [Observation(n, {"reason": r}) for r, n in FAILURES.items()]

    provider.get_meter("grpc_gateway.logs", "0.1.0").create_observable_counter(
        "grpc_gateway_log_lines_dropped", [observe],
        description="Log records not written because their file could not be (disk full, "
                    "read-only), by errno name.")
