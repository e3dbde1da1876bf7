"""Escaping for TEXT log lines: one record stays one line whatever a client or model sent."""

from __future__ import annotations

from typing import Any

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with every non-printable character (newline, ESC, DEL, ...) written as an
    escape, so what a client sent cannot forge a line or drive a terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else _ESCAPES.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def escape_field(value: Any) -> str:
    text = str(value or "-")
    # A space would shift the positional fields after it.
    return escape(text).replace(" ", "\\x20")


CONTINUATION = " "
"""What every continuation line of a record (a traceback's) starts with. A record's first line
starts with its level, so a client's newline inside an exception message cannot make a line
that reads as a record of its own (the dashboard's parser relies on this)."""


def escape_lines(text: str) -> str:
    """A traceback keeps its lines, each marked as a continuation; control characters inside
    them are escaped."""
    return "\n".join(CONTINUATION + escape(line) for line in text.split("\n"))
