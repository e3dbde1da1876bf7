"""A fake Arize receiver on 127.0.0.1: accepts what the real SDK's `ml.log_stream` POSTs to
`/v1/log` and decodes each JSON body into the SDK's own `Record` protobuf message.

It can answer with a chosen status, answer slowly, trickle an answer one byte at a time forever
(`trickle_next`), and be stopped and started again on the
same port (to play an Arize that is down for a while). Stopping closes the idle keep-alive
connections too (a real outage), but never one whose request it has taken: a request is either
recorded and answered 200, or refused without being recorded, so a client that retries what
failed can be checked for duplicates.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format


def record_class() -> Any:
    import os

    os.environ.setdefault("ARIZE_LOG_ENABLE", "false")
    from arize._generated.protocol.rec import public_pb2

    return public_pb2.Record


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    record: Any
    """The body decoded into `arize._generated.protocol.rec.public_pb2.Record`."""
    body: dict[str, Any]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (a timeout, a cut connection) is part of the game: no noise.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeArize:
    """`with FakeArize() as fake:` then point the SDK at `fake.host` / `fake.port`."""

    def __init__(self, port: int = 0) -> None:
        self.Record = record_class()
        self.received: list[Received] = []
        self.attempts = 0
        """Every request that reached the receiver, whatever it answered."""
        self.status = 200
        self.delay_s = 0.0
        self.fail_next = 0
        """Answer this many requests with `fail_status` before answering `status` again."""
        self.fail_status = 503
        self.trickle_next = 0
        """Answer this many requests one byte every 0.3 s, never finishing (until stopped)."""
        self.trickled = 0
        self.host = "127.0.0.1"
        self.port = port
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._release = threading.Event()
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._busy: set[socket.socket] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeArize:
        fake = self
        self._closing = False

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake._conns.add(self.connection)

            def finish(self) -> None:
                with fake._lock:
                    fake._conns.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                if fake._trickle():
                    self._trickle()
                    return
                with fake._lock:
                    taken = not fake._closing and len(raw) == length
                    if taken:
                        fake._busy.add(self.connection)
                try:
                    status = (fake._on_request(self.path, dict(self.headers.items()), raw)
                              if taken else 503)
                    body = b"{}"
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with fake._lock:
                        fake._busy.discard(self.connection)
                        if fake._closing:
                            self.close_connection = True

            def _trickle(self) -> None:
                self.close_connection = True
                answer = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000
                for i in range(len(answer)):
                    if fake._release.wait(0.3) or fake._closing:
                        return
                    try:
                        self.wfile.write(answer[i:i + 1])
                        self.wfile.flush()
                    except OSError:
                        return  # the client gave up: what a deadline should do

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = _Server((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            idle = self._conns - self._busy
        for conn in idle:  # waiting for a next request: cut, as an outage would
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._release.clear()

    def __enter__(self) -> FakeArize:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests ----------------------------------------------------------------------------

    def _trickle(self) -> bool:
        with self._lock:
            if self.trickle_next <= 0:
                return False
            self.trickle_next -= 1
            self.attempts += 1
            self.trickled += 1
            return True

    def _on_request(self, path: str, headers: dict[str, str], raw: bytes) -> int:
        with self._lock:
            self.attempts += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status
            status, delay = self.status, self.delay_s
        if delay:
            self._release.wait(delay)
        if status == 200:
            body = json.loads(raw)
            rec = json_format.ParseDict(body, self.Record())
            with self._lock:
                self.received.append(Received(path, {k.lower(): v for k, v in headers.items()},
                                              rec, body))
        return status

    def records(self) -> list[Any]:
        with self._lock:
            return [r.record for r in self.received]

    def wait_for(self, n: int, timeout: float = 15.0) -> list[Any]:
        """The first `n` decoded records, waiting for them to arrive."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            recs = self.records()
            if len(recs) >= n:
                return recs
            time.sleep(0.02)
        raise AssertionError(f"fake Arize got {len(self.records())} record(s), wanted {n}")

    def by_prediction_id(self) -> dict[str, Any]:
        return {r.prediction_id: r for r in self.records()}
