"""A fake Arize receiver on 127.0.0.1: accepts what the real SDK's `ml.log_stream` POSTs to
`/v1/log` and decodes each JSON body into the SDK's own `Record` protobuf message.

It can answer with a chosen status, answer slowly, and be stopped and started again on the
same port (to play an Arize that is down for a while).
"""

from __future__ import annotations

import json
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
        self.host = "127.0.0.1"
        self.port = port
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._release = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeArize:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                status = fake._on_request(self.path, dict(self.headers.items()), raw)
                body = b"{}"
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
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
