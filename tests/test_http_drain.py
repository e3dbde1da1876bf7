"""The HTTP listener's stop at the end of a drain (gateway/ingress/http/listener.py): calls still
running past the grace are answered 503 (a stream: an UNAVAILABLE error line), not dropped, and
the stop waits for nothing else (aiohttp alone took 1-2 s per busy connection and answered
nothing). Real gateway, real replicas, real sockets; `http.stop` is timed by wrapping it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from tests.http_support import HTTP, PREDICT, call, infer_body, iris, text, url

GRACE_S = 0.3
STREAM = "/demo.text.TextModel/PredictStream"


def time_http_stop(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Wrap the real `gw.http.stop` (Gateway._stop awaits it) to time it."""
    assert gw.http is not None
    real = gw.http.stop
    took: dict[str, float] = {}

    async def stop() -> None:
        t0 = time.perf_counter()
        await real()
        took["s"] = time.perf_counter() - t0

    monkeypatch.setattr(gw.http, "stop", stop)
    return took


async def wait_admitted(gw: Gateway, n: int) -> None:
    for _ in range(500):  # bounded: until the calls are upstream
        if gw.proxy.admitted >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never {n} call(s) admitted")


async def send(gw: Gateway, head: bytes, body: bytes) -> tuple[asyncio.StreamReader,
                                                                 asyncio.StreamWriter]:
    assert gw.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
    writer.write(head + b"Host: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    return reader, writer


async def narrow_connection(gw: Gateway) -> tuple[socket.socket, Any]:
    """A non-blocking client socket with a small window, and the gateway's side of it (aiohttp's
    handler) with small kernel buffers (loopback's grow to megabytes), so an answer waits in
    the gateway while the client does not read."""
    assert gw.http is not None and gw.http.server is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.http.port))
    for _ in range(250):  # bounded: until the gateway has the connection
        if gw.http.server.connections:
            break
        await asyncio.sleep(0.02)
    (conn,) = gw.http.server.connections
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    return sock, conn


def http_rows(gw: Gateway, route: str) -> dict[str, float]:
    """status_code -> count of the HTTP requests row for `route` (read in the process)."""
    assert gw.http is not None and gw.http.metrics is not None
    return {str(o.attributes["status_code"]): o.value for o in gw.http.metrics.requests()
            if o.attributes is not None and o.attributes["route"] == route}


async def test_a_call_past_the_grace_is_answered_503(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaker: a REST call still running when the grace ended lost its connection unanswered
    (metrics said 503, the client saw a reset) and the HTTP stop took 2 s."""
    async with start_gateway([text(None)], http=HTTP) as gw:
        took = time_http_stop(gw, monkeypatch)
        held = asyncio.ensure_future(call("POST", url(gw, PREDICT), json={
            "text": "x", "sleepS": 10}, headers={"x-request-id": "cut-at-stop-1"}))
        await wait_admitted(gw, 1)
        await gw.stop(grace=GRACE_S)
        r = await held
        assert r.status_code == 503
        assert r.json() == {"error": "the gateway is shutting down"}
        assert r.headers["x-request-id"] == "cut-at-stop-1"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["connection"] == "close"
        assert http_rows(gw, PREDICT) == {"503": 1}
        assert gw.http is not None and gw.http.in_proxy == 0 and gw.proxy.ongoing == 0
        # Only as long as the answer takes, not aiohttp's 1 + 1 s (a bound, not a benchmark).
        assert took["s"] < 1.0, took
    # The proxy recorded it UNAVAILABLE (cut at stop), as it does a gRPC call.
    lines = (tmp_path / "logs" / "gateway.log").read_text().splitlines()
    access = [s for s in lines if "cut-at-stop-1" in s and " access " in s]
    assert len(access) == 1 and " UNAVAILABLE " in access[0], access


async def test_a_stream_past_the_grace_ends_with_an_unavailable_line(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_gateway([text(None)], http=HTTP) as gw:
        took = time_http_stop(gw, monkeypatch)
        body = json.dumps({"text": "a", "repeat": 3, "sleepS": 10}).encode()
        reader, writer = await send(gw, b"POST %s HTTP/1.1\r\n" % STREAM.encode(), body)
        first = await asyncio.wait_for(reader.readuntil(b"}}\n"), 10)
        assert first.startswith(b"HTTP/1.1 200")
        await gw.stop(grace=GRACE_S)
        rest = await asyncio.wait_for(reader.read(), 5)  # to EOF: the connection is closed
        writer.close()
        # The chunked body ends properly, its last line saying why.
        assert rest.endswith(b"\r\n0\r\n\r\n"), rest
        errors = [ln for ln in rest.split(b"\r\n") if b'"error"' in ln]
        assert len(errors) == 1, rest
        assert json.loads(errors[0]) == {"error": {
            "code": 14, "status": "UNAVAILABLE", "message": "the gateway is shutting down"}}
        assert took["s"] < 1.0, took


async def test_a_slow_body_at_stop_is_answered_503(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client still sending its body at stop is answered too, and does not hold the stop."""
    async with start_gateway([text(None)], http=HTTP) as gw:
        took = time_http_stop(gw, monkeypatch)
        assert gw.http is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nx-request-id: slow-body-1\r\n"
                     b"Content-Length: 100\r\n\r\n{" % PREDICT.encode())
        await writer.drain()
        for _ in range(250):  # bounded: until its handler reads the body
            if gw.http.metrics is not None and gw.http.metrics.ongoing == 1:
                break
            await asyncio.sleep(0.02)
        await gw.stop(grace=GRACE_S)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"\r\nx-request-id: slow-body-1\r\n" in answer
        assert answer.endswith(b'{"error": "the gateway is shutting down"}')
        assert took["s"] < 1.0, took


async def test_an_idle_drain_closes_http_at_once(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing running, a keep-alive connection open and idle: the stop closes it and waits
    for nothing."""
    async with start_gateway([text(None)], http=HTTP) as gw:
        took = time_http_stop(gw, monkeypatch)
        body = json.dumps({"text": "a"}).encode()
        reader, writer = await send(gw, b"POST %s HTTP/1.1\r\n" % PREDICT.encode(), body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        await gw.stop(grace=GRACE_S)
        await asyncio.wait_for(reader.read(), 5)  # closed by the stop: EOF, not a hang
        writer.close()
        assert took["s"] < 0.5, took
        assert http_rows(gw, PREDICT) == {"200": 1}


async def test_a_drain_does_not_wait_for_an_answered_unread_body(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing running: a call answered before its body was read (404) leaves aiohttp reading
    the rest of that body (LINGER_S); the stop does not wait for it (aiohttp's shutdown gave
    it its whole second)."""
    async with start_gateway([text(None)], http=HTTP) as gw:
        took = time_http_stop(gw, monkeypatch)
        assert gw.http is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 404 "), head
        await gw.stop(grace=GRACE_S)
        await asyncio.wait_for(reader.read(), 5)  # closed by the stop
        writer.close()
        assert http_rows(gw, "other") == {"404": 1}
        assert took["s"] < 0.5, took


async def test_an_answer_being_written_at_stop_is_written_in_full(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call answered within the grace whose client reads its answer slowly (the answer
    waits in the gateway's buffers at stop): the client still gets all of it."""
    async with start_gateway([iris(None)], http=HTTP) as gw:
        assert gw.http is not None and gw.http.server is not None
        real = gw.http.stop
        stopping = asyncio.Event()

        async def stop() -> None:
            stopping.set()
            await real()

        monkeypatch.setattr(gw.http, "stop", stop)
        rows = [(5.1, 3.5, 1.4, 0.2)] * 40_000  # a ~0.75 MB answer
        body = json.dumps(infer_body(rows)).encode()
        sock, conn = await narrow_connection(gw)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        for _ in range(500):  # bounded: until the answer is stuck in the writing
            if conn.transport is not None and conn.transport.get_write_buffer_size() > 0:
                break
            await asyncio.sleep(0.02)
        assert conn.transport is not None and conn.transport.get_write_buffer_size() > 0
        done = asyncio.ensure_future(gw.stop(grace=GRACE_S))
        await asyncio.wait_for(stopping.wait(), 10)
        await asyncio.sleep(0.3)  # past what aiohttp's own shutdown gives (listener.SHUTDOWN_S)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await done
        head, _, data = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        outputs = {o["name"]: o for o in json.loads(data)["outputs"]}
        assert outputs["label"]["shape"] == [len(rows)]
        assert http_rows(gw, "/v2/models/{model}/infer") == {"200": 1}


async def test_an_answer_converted_at_stop_is_not_cut(start_gateway: Any) -> None:
    """A call that ends within the grace but whose (big) answer is still being converted when
    the listener stops is answered in full (the drain waits for the proxy's calls only)."""
    async with start_gateway([iris(None)], http=HTTP) as gw:
        rows = [(5.1, 3.5, 1.4, 0.2)] * 80_000
        held = asyncio.ensure_future(call("POST", url(gw, "/v2/models/iris/infer"),
                                          json=infer_body(rows)))
        await wait_admitted(gw, 1)
        await gw.stop(grace=10)
        r = await held
        assert r.status_code == 200, r.text[:300]
        assert r.json()["outputs"][0]["shape"] == [len(rows)]
