"""Records as JSON lines in a rotating file: what would go to Arize, readable by a person.

The default exporter when no Arize keys are set. Each line is one record with the fields of
Arize's `log_stream` (prediction id, model, timestamp, label, score, features, tags), or one
actual; `kind` says which.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from exporters.base import ExporterContext, ExportResult, Record, RecordExporter

log = logging.getLogger("exporters.jsonl")

DEFAULT_FILE = "records.jsonl"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


class JsonlExporter(RecordExporter):
    """Options: `path` (default `<logs_dir>/records.jsonl`), `max_bytes` (rotate past this
    size; 0 never), `backup_count` (rotated files kept)."""

    name = "jsonl"

    def __init__(self, options: Mapping[str, Any], context: ExporterContext) -> None:
        super().__init__(options, context)
        path = self.options.get("path") or context.settings.get("path")
        self.path = Path(path) if path else context.logs_dir / DEFAULT_FILE
        self.max_bytes = int(self.options.get("max_bytes", DEFAULT_MAX_BYTES))
        self.backup_count = int(self.options.get("backup_count", DEFAULT_BACKUP_COUNT))
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._warned = False

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.backup_count <= 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backup_count - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def export(self, batch: Sequence[Record]) -> ExportResult:
        lines = []
        bad = 0
        for rec in batch:
            try:
                lines.append(json.dumps(rec.to_dict(), ensure_ascii=False, default=str) + "\n")
            except (TypeError, ValueError):
                bad += 1
        text = "".join(lines)
        with self._lock:
            try:
                f = self._open()
                if self.max_bytes and f.tell() and f.tell() + len(text) > self.max_bytes:
                    self._rotate()
                    f = self._open()
                f.write(text)
                f.flush()
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.error("cannot write records to %s: %s", self.path, e.strerror or e)
                return ExportResult(failed=len(lines), invalid=bad, error=f"OSError: {e.strerror}")
        return ExportResult(exported=len(lines), invalid=bad)

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError:
                    return False
        return True

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None
