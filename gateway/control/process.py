"""A local replica's operating-system process: its output pipe, its exit, its restarts.

Every wait on a child here is bounded, and its output is drained for as long as the pipe is
open: a replica blocked writing to a full pipe would stop answering calls, and one that never
closes its pipe would hold the gateway's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

MAX_LINE_BYTES = 16 * 1024
"""Longer output lines are passed on in pieces of this size (each marked as cut)."""
READ_CHUNK = 64 * 1024
KILL_WAIT_S = 5.0
"""How long a SIGKILLed child gets to be reaped before the gateway stops waiting for it."""

RESTART_BACKOFF_INITIAL_S = 0.2
RESTART_BACKOFF_MAX_S = 300.0
"""A crash-looping replica is restarted at most this far apart (like Kubernetes' 5 minutes)."""
RESTART_RESET_AFTER_S = 30.0
"""A replica that ran this long before it failed starts over from the initial delay."""


def restart_delay(failures: int) -> float:
    """Delay before restart number `failures` (1, 2, ...) of a crash loop: doubling, capped."""
    exp = min(max(failures - 1, 0), 32)
    return float(min(RESTART_BACKOFF_INITIAL_S * (2 ** exp), RESTART_BACKOFF_MAX_S))


async def pump_output(stream: asyncio.StreamReader, emit: Callable[[bytes], None]) -> None:
    """Hand every line of `stream` to `emit` until EOF, in bounded pieces.

    Reads fixed-size chunks (never `readline`, which gives up on a line over the reader's
    limit), so no line length can stop the draining.
    """
    buf = b""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            break
        buf += chunk
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            _emit_line(line + b"\n", emit)
        while len(buf) >= MAX_LINE_BYTES:
            _safe_emit(emit, buf[:MAX_LINE_BYTES] + b" [line continues]\n")
            buf = buf[MAX_LINE_BYTES:]
    if buf:
        _emit_line(buf, emit)


def _emit_line(line: bytes, emit: Callable[[bytes], None]) -> None:
    while len(line) > MAX_LINE_BYTES:
        _safe_emit(emit, line[:MAX_LINE_BYTES] + b" [line continues]\n")
        line = line[MAX_LINE_BYTES:]
    _safe_emit(emit, line)


def _safe_emit(emit: Callable[[bytes], None], line: bytes) -> None:
    try:
        emit(line)
    except Exception:  # a failing consumer must not stop the draining
        pass


async def wait_exit(proc: asyncio.subprocess.Process, timeout: float | None) -> bool:
    """True once `proc` has exited (its pipes may still be held open by its own children)."""
    end = None if timeout is None else time.monotonic() + timeout
    while proc.returncode is None:
        if end is not None and time.monotonic() >= end:
            return False
        await asyncio.sleep(0.05)
    return True


async def terminate(proc: asyncio.subprocess.Process | None, grace: float = 5.0) -> None:
    """Ask `proc` to stop, then SIGKILL after `grace` (+1 s); returns within about grace + 6 s.

    A replica is asked by closing its stdin (it ignores a SIGTERM sent to the whole process
    group while its gateway lives: the gateway drains first, then stops it); a process
    without a stdin pipe gets SIGTERM."""
    if proc is None:
        return
    if proc.returncode is not None:
        kill_group(proc)
        return
    if proc.stdin is not None:
        proc.stdin.close()
    else:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    if await wait_exit(proc, grace + 1):
        kill_group(proc)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await wait_exit(proc, KILL_WAIT_S)
    kill_group(proc)


SPAWN_FDS = 16
"""Free file descriptors a replica start needs at least (pipes, uvloop's socketpairs)."""


def check_fd_headroom(fd_dir: str = "/proc/self/fd") -> None:
    """OSError(EMFILE) when fewer than SPAWN_FDS descriptors are left: uvloop's spawn, out of
    them part-way, leaves its socketpairs open for good and says `Errno -1`. (Linux only: a
    system without /proc/self/fd is not checked.)"""
    try:
        used = len(os.listdir(fd_dir))
    except OSError:
        return
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and limit - used < SPAWN_FDS:
        raise OSError(errno.EMFILE, f"too few file descriptors left to start a replica "
                                    f"({used} open, limit {limit})")


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL what is left of the process group a replica led (started in its own session):
    the model's child processes must not outlive their replica."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)


NO_REPORT = "replica process exited before it reported"


def read_report(fd: int) -> dict[str, Any]:
    """The JSON a starting replica writes on its report pipe (blocking; run off the loop)."""
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    if not chunks:
        return {"error": NO_REPORT}
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "unreadable report from replica process"}
    return data if isinstance(data, dict) else {"error": "bad report"}
