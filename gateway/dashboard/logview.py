"""Reading a component's log file for the dashboard: the tail, filtered, and what came after.

Bounded whatever the file: at most `MAX_READ_BYTES` (256 KiB) are read per request and at
most `MAX_LINES` (2,000) entries returned; older parts are paged with `before=<start>`. Secrets
are scrubbed from every line *before* the search filter runs (a search on the raw lines would
tell a viewer, one character at a time, what the scrubbed lines hide). Both encodings are
understood: TEXT lines (`LEVEL date time application deployment replica request_id route where
- message`, Ray Serve's order) and JSON objects; a line that is neither (a traceback's
continuation, marked by escape's CONTINUATION) joins the entry before it. Runs in a worker
thread (file I/O, scrubbing and JSON encoding stay off the event loop).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.logs.escape import CONTINUATION

MAX_READ_BYTES = 256 * 1024
MAX_LINES = 2000
DEFAULT_LINES = 1000
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


@dataclass
class Entry:
    level: str
    time: str
    request_id: str
    message: str
    line: str

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "time": self.time, "request_id": self.request_id,
                "message": self.message, "line": self.line}


def parse(line: str) -> Entry | None:
    """One log line as an entry; None for a continuation line (one the gateway marked with
    escape's CONTINUATION, or any other line that does not start a record)."""
    if line.startswith(CONTINUATION):
        return None
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and str(obj.get("levelname", "")) in LEVELS:
            return Entry(str(obj["levelname"]), str(obj.get("asctime", "")),
                         str(obj.get("request_id", "") or ""), str(obj.get("message", "")),
                         line)
    parts = line.split(" ", 10)
    if len(parts) >= 10 and parts[0] in LEVELS and parts[9] == "-":
        rid = "" if parts[6] == "-" else parts[6]
        return Entry(parts[0], f"{parts[1]} {parts[2]}", rid,
                     parts[10] if len(parts) > 10 else "", line)
    return None


def _entries(text: str) -> list[Entry]:
    out: list[Entry] = []
    for raw in text.split("\n"):
        if not raw:
            continue
        e = parse(raw)
        if e is not None:
            out.append(e)
        elif out:
            out[-1].message += "\n" + raw
            out[-1].line += "\n" + raw
        else:
            out.append(Entry("", "", "", raw, raw))  # output that bypassed the logging
    return out


def read(path: Path, after: int | None = None, level: str = "", query: str = "",
         limit: int = DEFAULT_LINES, scrub: Callable[[str], str] | None = None,
         before: int | None = None) -> dict[str, Any]:
    """The entries of `path` that pass the filters: the last `limit` of its tail, those written
    past byte `after` (following), or those before byte `before` (paging back). `offset` in the
    answer is where to follow from, `start` where the window read began (the next page back)."""
    limit = max(1, min(limit, MAX_LINES))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            end_at = size if before is None or not 0 <= before <= size else before
            start = max(0, end_at - MAX_READ_BYTES)
            if after is not None and 0 <= after <= size:
                start = max(start, after)  # rotated (shrunk): from the new tail
            f.seek(start)
            data = f.read(end_at - start)
    except FileNotFoundError:
        return {"path": str(path), "exists": False, "offset": 0, "start": 0, "entries": [],
                "truncated": False}
    # Only whole lines: a partial first line (we started mid-file) and a partial last one
    # (still being written) are left for the next read.
    begin = 0
    if start > 0 and (after is None or start != after):
        begin = data.find(b"\n") + 1
    end = data.rfind(b"\n") + 1
    text = data[begin:end].decode("utf-8", "replace")
    entries = _entries(text)
    if scrub is not None:
        for e in entries:
            e.line = scrub(e.line)
            e.message = scrub(e.message)
    floor = LEVELS.get(level.upper(), 0)
    if floor:
        entries = [e for e in entries if LEVELS.get(e.level, 100) >= floor]
    if query:
        # A request id (one some entry carries) matches exactly: `req-1` is not `req-10`.
        # Anything else is a text search in the (scrubbed) lines.
        q = query.lower()
        by_id = [e for e in entries if q == e.request_id.lower()]
        entries = by_id or [e for e in entries if q in e.line.lower()]
    # Truncated: entries left out by `limit`, older lines this window did not reach, or (when
    # following) lines written since `after` that the window skipped.
    truncated = len(entries) > limit or (start + begin > 0 and after is None) or \
        (after is not None and start > after)
    return {"path": str(path), "exists": True, "offset": start + end, "start": start + begin,
            "entries": [e.to_dict() for e in entries[-limit:]], "truncated": truncated}


def read_json(path: Path, after: int | None = None, level: str = "", query: str = "",
              limit: int = DEFAULT_LINES, scrub: Callable[[str], str] | None = None,
              before: int | None = None) -> str:
    """`read`'s answer as JSON text: for a worker thread (scrubbing and encoding a large
    answer would otherwise hold the event loop the gRPC calls run on)."""
    return json.dumps(read(path, after, level, query, limit, scrub, before), default=str)
