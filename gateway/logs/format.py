"""TEXT and JSON line formats and the size-rotated file handler."""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

from gateway.logs import write_errors
from gateway.logs.escape import escape, escape_field, escape_lines
from gateway.logs.settings import LogSettings

_FIELDS = ("application", "deployment", "replica", "request_id", "route")


_last_second: tuple[int, str] = (-1, "")
"""The last whole second formatted and its text: access lines come many to a second, and
localtime + strftime cost ~5 us a line. One tuple, swapped whole: safe across threads."""


def _asctime(record: logging.LogRecord) -> str:
    global _last_second
    sec = int(record.created)
    last = _last_second
    if last[0] != sec:
        last = _last_second = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
    return f"{last[1]},{int(record.msecs):03d}"


def _field(value: Any) -> str:
    # Most fields (ids, names, paths) need no escaping: skip the work for them.
    if value.__class__ is str and value and value.isprintable() and " " not in value:
        return value  # type: ignore[no-any-return]
    return escape_field(value)


class TextFormatter(logging.Formatter):
    """`LEVEL date time application deployment replica request_id route file:line - message`,
    Ray Serve's field order, with `-` for a field that does not apply.

    One record is one line: fields and message are escaped (they carry request ids, method
    paths, application names and other strings from clients and models).
    """

    def format(self, record: logging.LogRecord) -> str:
        d = record.__dict__
        fields = " ".join([_field(d.get(k)) for k in _FIELDS])
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

    def handleError(self, record: logging.LogRecord) -> None:
        write_errors.report(self, record)  # once on stderr, then counted (not per line)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115


def file_handler(path: Path, settings: LogSettings) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    h = _RotatingFileHandler(
        path, maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
    )
    h.setFormatter(formatter(settings.encoding))
    return h
