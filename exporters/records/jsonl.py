"""Records as JSON lines in a rotating file: what would go to Arize, readable by a person.

The default exporter when no Arize keys are set. Each line is one record with the fields of
Arize's `log_stream` (prediction id, model, timestamp, label, score, features, tags), or one
actual; `kind` says which. The file is strict JSON: NaN and the infinities are written as the
strings "NaN", "Infinity" and "-Infinity" (as in protobuf's JSON mapping).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exporters.records.base import ExporterContext, ExportResult, Record, RecordExporter

log = logging.getLogger("exporters.jsonl")

DEFAULT_FILE = "records.jsonl"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


def _finite(value: Any) -> Any:
    """NaN and the infinities as the strings protobuf's JSON mapping uses: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode(rec: Record) -> bytes:
    """One record as one line of strict JSON (UTF-8)."""
    data = rec.to_dict()
    try:
        text = json.dumps(data, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), ensure_ascii=False, default=str, allow_nan=False)
    return text.encode("utf-8") + b"\n"


class JsonlExporter(RecordExporter):
    """Options: `path` (default `<logs_dir>/records.jsonl`), `max_bytes` (rotate past this
    size in bytes; 0 never), `backup_count` (rotated files kept).

    A batch is appended with one `write` loop on an `O_APPEND` descriptor; when it fails
    (disk full, file too large), the file is cut back to where the batch began, so a failed
    batch leaves neither records counted failed nor a half line behind."""

    name = "jsonl"

    def __init__(self, options: Mapping[str, Any], context: ExporterContext) -> None:
        super().__init__(options, context)
        path = self.options.get("path") or context.settings.get("path")
        self.path = Path(path) if path else context.logs_dir / DEFAULT_FILE
        self.max_bytes = int(self.options.get("max_bytes", DEFAULT_MAX_BYTES))
        self.backup_count = int(self.options.get("backup_count", DEFAULT_BACKUP_COUNT))
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._warned = False
        self._torn = False
        """A failed write could not be cut back: the next write starts on a new line."""

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _rotate(self) -> None:
        self._close()
        if self.backup_count <= 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backup_count - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _write(self, data: bytes) -> None:
        fd = self._open()
        size = os.fstat(fd).st_size
        if self.max_bytes and size and size + len(data) > self.max_bytes:
            self._rotate()
            fd = self._open()
            size = os.fstat(fd).st_size
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            try:
                os.ftruncate(fd, size)
                self._torn = False
            except OSError:
                self._torn = True
            raise
        self._torn = False

    def export(self, batch: Sequence[Record]) -> ExportResult:
        lines = []
        bad = 0
        for rec in batch:
            try:
                lines.append(encode(rec))
            except (TypeError, ValueError):
                bad += 1
        if not lines:
            return ExportResult(invalid=bad)
        with self._lock:
            try:
                self._write(b"".join(lines))
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.error("cannot write records to %s: %s", self.path, e.strerror or e)
                return ExportResult(failed=len(lines), invalid=bad, error=f"OSError: {e.strerror}")
        return ExportResult(exported=len(lines), invalid=bad)

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        return True  # every write goes straight to the file

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        with self._lock:
            self._close()
