"""A starting replica's guard: it must not outlive its gateway, even while its model loads.

The model's constructor (and its first `reconfigure`) may take minutes or hang, and the event
loop that watches the lifeline only runs after it. So, first thing in the replica's main, a
daemon thread watches the lifeline (its EOF) and the parent pid; when the gateway is gone (or
has asked us to stop) before the replica serves, the replica ends at once with its process
group (the model's own children). Once serving, the loop takes over (`hand_over`) and stops
gracefully instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from types import FrameType

POLL_S = 0.2
_EXIT_GATEWAY_GONE = 3


class StartupGuard:
    """Signal dispositions and a watch thread from the replica's first moment to `hand_over`."""

    def __init__(self, parent_pid: int, lifeline: int) -> None:
        self._parent = parent_pid
        self._lifeline = lifeline
        self._lock = threading.Lock()
        self._handed_over = False
        self._done = threading.Event()

    def start(self) -> None:
        # Signals first: a SIGINT during the model's import would otherwise raise
        # KeyboardInterrupt somewhere in the user's code.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._watch, name="replica-startup-guard", daemon=True).start()

    def hand_over(self) -> None:
        """The loop now watches the lifeline and handles signals; the thread stops."""
        with self._lock:
            self._handed_over = True
        self._done.set()

    def _gateway_managed(self) -> bool:
        return bool(self._parent) and os.getppid() == self._parent

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # While its gateway lives, the gateway stops us (lifeline), as once serving.
        if self._gateway_managed():
            return
        if not self._parent:  # started by hand: its shell's job is not ours to end
            os._exit(128 + signum)
        end_group_and_exit(128 + signum)

    def _watch(self) -> None:
        while not self._done.wait(POLL_S if self._lifeline < 0 else 0):
            if self._parent and os.getppid() != self._parent:
                self._gone()
            if self._lifeline >= 0:
                with contextlib.suppress(OSError, ValueError):
                    readable, _, _ = select.select([self._lifeline], [], [], POLL_S)
                    if readable:
                        self._check_lifeline()

    def _check_lifeline(self) -> None:
        with self._lock:
            if self._handed_over:
                return
            try:
                data = os.read(self._lifeline, 4096)
            except OSError:
                data = b""
            if not data:
                self._gone()

    def _gone(self) -> None:
        if not self._handed_over:  # once serving, the loop stops us gracefully instead
            end_group_and_exit(_EXIT_GATEWAY_GONE)


def end_group_and_exit(code: int) -> None:
    """Exit now, taking the model's child processes along (our own process group, when we
    lead one: the gateway starts each replica in its own session)."""
    kill_own_group()
    os._exit(code)


def kill_own_group() -> None:
    """SIGKILL the other members of our process group when we lead it (never a shell's
    group: a replica started by hand leaves its job's group alone)."""
    me = os.getpid()
    if os.getpgrp() != me:
        return
    for pid in group_members(me):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` other than ours (Linux /proc; empty elsewhere)."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
                if int(stat[stat.rindex(b")") + 2:].split()[2]) == pgid:
                    found.append(int(name))
    return found
