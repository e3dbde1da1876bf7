"""An overall deadline for every HTTP request the Arize SDK sends.

`requests`' timeout bounds each socket read, not the request: a receiver that answers one
byte at a time keeps a send (and one of the SDK's few worker threads) busy forever, and
Python joins those threads at exit. So the SDK's session gets a transport adapter that
registers each request with a watchdog; past `total_s` (or at shutdown) the watchdog shuts
the request's socket down, the blocked read fails at once, and the send ends as a timeout:
counted, retried, its thread and slot freed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()
"""The watch of the request this thread is sending (set by `DeadlineAdapter.send`)."""


class _Watch:
    __slots__ = ("conns", "deadline", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conns: list[Any] = []
        self.expired = False


def _attach(conn: Any) -> None:
    watch: _Watch | None = getattr(_current, "watch", None)
    if watch is not None:
        watch.conns.append(conn)


class _HTTPPool(HTTPConnectionPool):
    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        _attach(conn)
        return super()._make_request(conn, *args, **kwargs)


class _HTTPSPool(HTTPSConnectionPool):
    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        _attach(conn)
        return super()._make_request(conn, *args, **kwargs)


def _cut(watch: _Watch) -> None:
    watch.expired = True
    for conn in list(watch.conns):
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Cuts the connections of requests past their deadline (one daemon thread, polling)."""

    TICK_S = 0.05

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self._lock = threading.Lock()
        self._watches: set[_Watch] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def begin(self) -> _Watch:
        with self._lock:
            if self._closed:
                raise requests.exceptions.ConnectionError("the Arize exporter is stopping")
            watch = _Watch(time.monotonic() + self.total_s)
            self._watches.add(watch)
            if self._thread is None:
                # A daemon: it never holds the process up, and the sockets it cuts free the
                # SDK's own (non-daemon) threads.
                self._thread = threading.Thread(target=self._run, name="arize-deadline",
                                                daemon=True)
                self._thread.start()
        _current.watch = watch
        return watch

    def end(self, watch: _Watch) -> None:
        _current.watch = None
        with self._lock:
            self._watches.discard(watch)

    def abort_all(self) -> int:
        """Stopping: cut every request still running, refuse new ones. Returns how many."""
        with self._lock:
            self._closed = True
            watches = list(self._watches)
        for watch in watches:
            _cut(watch)
        return len(watches)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_S)
            now = time.monotonic()
            with self._lock:
                # Cut again on every tick: a connection may still be opening when first cut.
                due = [w for w in self._watches if self._closed or w.deadline <= now]
            for watch in due:
                _cut(watch)


class DeadlineAdapter(HTTPAdapter):
    """`HTTPAdapter` whose requests (body included) end within the watchdog's total time."""

    def __init__(self, watchdog: Watchdog) -> None:
        self._watchdog = watchdog
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy: Any, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager

    def send(self, request: Any, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> Any:
        watch = self._watchdog.begin()
        try:
            resp = super().send(request, stream=stream, timeout=timeout, verify=verify,
                                cert=cert, proxies=proxies)
            if not stream:
                _ = resp.content  # read the body while the deadline still holds
            return resp
        except Exception:
            if watch.expired:
                raise requests.exceptions.Timeout(
                    f"no complete answer within {self._watchdog.total_s:g} s") from None
            raise
        finally:
            self._watchdog.end(watch)


def install(session: Any, total_s: float) -> Watchdog:
    """Mount a `DeadlineAdapter` on a `requests` session; returns its watchdog."""
    watchdog = Watchdog(total_s)
    adapter = DeadlineAdapter(watchdog)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return watchdog
