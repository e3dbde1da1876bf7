"""HTTP ingress under hostile or heavy input: big bodies converted off the loop, malformed
values as 400s, a catch-all 500 in KServe's form, body and header timeouts, a connection cap,
bounded inflating of compressed bodies, clients leaving unary calls, the application header
with a route prefix, folded method labels."""

from __future__ import annotations

import asyncio
import gzip
import json
import resource
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import yaml

from gateway.ingress.http import oip_rest
from gateway.ingress.http.errors import RestError
from gateway.pb import text_model_pb2 as tpb
from tests.conftest import text_stub
from tests.http_support import HTTP, PREDICT, call, infer_body, iris, text, url
from tests.metrics_util import scrape, scrape_until
from tests.ops_support import GatewayProcess

INFER = "/iris/v2/models/iris/infer"


async def test_a_big_rest_body_does_not_stall_grpc_calls(start_gateway: Any) -> None:
    rows: list[Any] = [(5.1, 3.5, 1.4, 0.2)] * 200_000  # ~4.4 MB of JSON, 800k values
    rows[-1] = (1, 2, 3, "x")  # converted in full, then 400: no model time in the window
    body = json.dumps(infer_body(rows)).encode()

    def convert() -> float:
        t0 = time.perf_counter()
        with pytest.raises(RestError):
            oip_rest.infer_request_bytes(body, None, "iris", "")
        return time.perf_counter() - t0

    async with start_gateway([iris(), text()], http=HTTP) as gw:
        assert gw.http is not None
        # What converting this body costs now (the machine may be loaded): on the loop, a
        # gRPC call would wait about that long.
        cost = await asyncio.to_thread(convert)
        # The first body over 64 KiB starts the worker processes (until one is up, bodies go
        # to a thread); big bodies use them from then on.
        r = await call("POST", url(gw, INFER), json=infer_body(rows[-5000:]))
        assert r.status_code == 400
        for _ in range(300):  # bounded: a spawned worker imports the gateway's modules
            if gw.http.offload.warm:
                break
            await asyncio.sleep(0.1)
        assert gw.http.offload.warm
        async with grpc.aio.insecure_channel(gw.address) as ch:
            stub = text_stub(ch)
            md = (("application", "text"),)
            await stub.Predict(tpb.PredictRequest(text="warm"), metadata=md, timeout=10)
            rest = asyncio.create_task(call("POST", url(gw, INFER), data=body, timeout=60))
            worst = 0.0
            for _ in range(2000):  # bounded: ~the REST call's length
                if rest.done():
                    break
                t0 = time.perf_counter()
                await stub.Predict(tpb.PredictRequest(text="x"), metadata=md, timeout=10)
                worst = max(worst, time.perf_counter() - t0)
                await asyncio.sleep(0.01)
            r = await rest
        assert r.status_code == 400 and "not a FP32 value" in r.json()["error"], r.text
        assert gw.http.offload.offloaded >= 1
    # Inline, a call waited about `cost` (over a second, more under load).
    assert worst < max(0.5, cost / 2), (worst, cost)


BAD_BODIES = [
    ('{"inputs":[{"name":"f","shape":[1],"datatype":["FP32"],"data":[1]}]}', "input 'f'"),
    ('{"inputs":[{"name":"f","shape":[1],"datatype":{"a":1},"data":[1]}]}', "input 'f'"),
    ('{"inputs":[{"name":"f","shape":[1180591620717411303424],"datatype":"FP32",'
     '"data":[1]}]}', "input 'f'"),
    ('{"id":"\\ud800","inputs":[{"name":"f","shape":[1],"datatype":"FP32","data":[1]}]}',
     "'id'"),
    ('{"inputs":[{"name":"\\udc00","shape":[1],"datatype":"FP32","data":[1]}]}', "inputs[0]"),
    ('{"parameters":{"k":"\\ud800"},"inputs":[{"name":"f","shape":[1],"datatype":"FP32",'
     '"data":[1]}]}', "request"),
    ('{"parameters":{"\\ud800":1},"inputs":[{"name":"f","shape":[1],"datatype":"FP32",'
     '"data":[1]}]}', "request"),
    ('{"inputs":[{"name":"f","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}',
     "input 'f'"),
    ('{"inputs":[{"name":"f","shape":[1],"datatype":"FP32","data":[1]}],'
     '"outputs":[{"name":"\\ud800"}]}', "outputs[0]"),
]


async def test_malformed_values_are_400_with_the_request_id(start_gateway: Any) -> None:
    async with start_gateway([iris(None)], http=HTTP) as gw:
        for body, why in BAD_BODIES:
            r = await call("POST", url(gw, "/v2/models/iris/infer"), data=body.encode(),
                           headers={"x-request-id": "bad-1"})
            assert r.status_code == 400, (body, r.status_code, r.text)
            assert r.headers["x-request-id"] == "bad-1"
            assert r.json()["error"].startswith(why), (body, r.json())
        # A transcoded body with a lone surrogate is a 400 too.
        r = await call("POST", url(gw, PREDICT), data=b'{"text": "\\ud800"}',
                       headers={"application": "classifier"})
        assert r.status_code in (400, 404), r.text


async def test_a_gateway_bug_is_a_kserve_500_not_charged_to_the_deployment(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("boom")

    # Fault injection: a bug in the body conversion (no real input reaches one).
    monkeypatch.setattr(oip_rest, "infer_request_bytes", broken)
    async with start_gateway([iris()], http=HTTP) as gw:
        r = await call("POST", url(gw, INFER), json=infer_body(),
                       headers={"x-request-id": "bug-1"})
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "bug-1"
        assert "bug-1" in r.json()["error"]
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_num_http_requests_total", route=INFER, method="POST",
            application="classifier", status_code="500") == 1.0)
        assert not s.where("ray_serve_num_deployment_http_error_requests_total",
                           deployment="Iris")
    bugs = [r for r in caplog.records if "failed in the gateway" in r.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info is not None


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_all(s: socket.socket, limit_s: float) -> bytes:
    s.settimeout(limit_s)
    out = b""
    try:
        while len(out) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    return out


async def test_slow_bodies_and_headers_time_out(start_gateway: Any) -> None:
    async with start_gateway([iris()], http={**HTTP, "body_timeout_s": 1.0}) as gw:
        assert gw.http is not None
        port = gw.http.port

        def trickle_body() -> tuple[bytes, float]:
            s = _connect(port)
            t0 = time.monotonic()
            s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                      b"x-request-id: slow-1\r\nContent-Length: 100\r\n\r\n{")
            got = _read_all(s, 10)
            s.close()
            return got, time.monotonic() - t0

        def trickle_headers() -> tuple[bytes, float]:
            s = _connect(port)
            t0 = time.monotonic()
            s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nX-A: ")
            got = _read_all(s, 10)
            s.close()
            return got, time.monotonic() - t0

        (body, t_body), (head, t_head) = await asyncio.gather(
            asyncio.to_thread(trickle_body), asyncio.to_thread(trickle_headers))
        assert body.startswith(b"HTTP/1.1 408"), body[:200]
        assert b"x-request-id: slow-1" in body.lower() or b"X-Request-Id: slow-1" in body
        assert b"http.body_timeout_s" in body
        assert t_body < 8
        assert head == b"" and t_head < 8  # closed without an answer
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_num_http_requests_total", route=INFER, method="POST",
            application="classifier", status_code="408") == 1.0)
        assert list(s.series("ray_serve_num_ongoing_http_requests").values()) == [0.0]


async def test_connections_past_the_cap_get_503(start_gateway: Any) -> None:
    async with start_gateway([iris()], http={**HTTP, "max_connections": 3}) as gw:
        assert gw.http is not None and gw.http.server is not None
        held = [await asyncio.to_thread(_connect, gw.http.port) for _ in range(3)]
        try:
            for _ in range(50):  # bounded: until the server has seen the three
                if len(gw.http.server.connections) >= 3:
                    break
                await asyncio.sleep(0.02)
            extra = await asyncio.to_thread(_connect, gw.http.port)
            got = await asyncio.to_thread(_read_all, extra, 5)
            extra.close()
            assert got.startswith(b"HTTP/1.1 503"), got[:200]
            assert b"http.max_connections" in got
        finally:
            for s in held:
                s.close()
        # Room again once they are closed.
        for _ in range(50):
            if not gw.http.server.connections:
                break
            await asyncio.sleep(0.02)
        r = await call("POST", url(gw, INFER), json=infer_body())
        assert r.status_code == 200, r.text


async def test_compressed_bodies_inflate_within_the_limit(start_gateway: Any) -> None:
    body = json.dumps(infer_body()).encode()
    async with start_gateway([iris()], http=HTTP,
                             proxy={"port": 0, "max_message_bytes": 1 << 20}) as gw:
        for enc, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            r = await call("POST", url(gw, INFER), data=data,
                           headers={"Content-Encoding": enc})
            assert r.status_code == 200, (enc, r.text)
            assert r.json()["outputs"]
        r = await call("POST", url(gw, INFER), data=body, headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]
        r = await call("POST", url(gw, INFER), data=gzip.compress(body)[:-8],
                       headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400, r.text
        # A bomb: 512 MiB of zeros in ~0.5 MB. Refused at the 1 MiB limit, never inflated.
        co = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros = b"\0" * (1 << 20)
        bomb = b"".join(co.compress(zeros) for _ in range(512)) + co.flush()
        peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = await call("POST", url(gw, INFER), data=bomb, headers={"Content-Encoding": "gzip"})
        grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024
        assert r.status_code == 413, r.text
        assert "max_message_bytes" in r.json()["error"]
        assert grew_mib < 64, grew_mib


async def test_a_client_leaving_a_unary_call_cancels_it(start_gateway: Any) -> None:
    async with start_gateway([text()], http=HTTP) as gw:
        assert gw.http is not None
        _, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
        body = b'{"text": "a", "sleepS": 5}'
        writer.write(b"POST /text" + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"x-request-id: left-1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        for _ in range(100):  # bounded: until the call is upstream
            if gw.proxy.ongoing == 1:
                break
            await asyncio.sleep(0.02)
        assert gw.proxy.ongoing == 1
        t0 = time.monotonic()
        writer.close()
        await writer.wait_closed()
        for _ in range(150):  # well before the replica's 5 s
            if gw.proxy.ongoing == 0 and gw.http.in_proxy == 0:
                break
            await asyncio.sleep(0.02)
        assert gw.proxy.ongoing == 0 and gw.http.in_proxy == 0
        assert time.monotonic() - t0 < 3
        route = "/text" + PREDICT
        s = await scrape_until(gw, lambda s: s.get(
            "ray_serve_num_http_requests_total", route=route, method="POST",
            application="text", status_code="499") == 1.0)
        assert s.get("ray_serve_num_http_requests_total", route=route, method="POST",
                     application="text", status_code="200") is None
        # The slot is free again: a call goes through at once.
        r = await call("POST", url(gw, "/text" + PREDICT), json={"text": "b"})
        assert r.status_code == 200


async def test_application_header_with_its_own_prefix(start_gateway: Any) -> None:
    async with start_gateway([iris(), text()], http=HTTP) as gw:
        r = await call("POST", url(gw, "/text" + PREDICT), json={"text": "a"},
                       headers={"application": "text"})
        assert r.status_code == 200, r.text
        # Another application's prefix is not stripped: the header wins, and the path is
        # taken as it is.
        r = await call("POST", url(gw, "/iris" + PREDICT), json={"text": "a"},
                       headers={"application": "text"})
        assert r.status_code == 404, r.text


async def test_unusual_methods_share_one_label(start_gateway: Any) -> None:
    async with start_gateway([iris()], http=HTTP) as gw:
        for verb in ("PROPFIND", "MKCOL", "BREW"):
            r = await call(verb, url(gw, INFER))
            assert r.status_code in (400, 405), (verb, r.status_code)
        s = await scrape(gw)
        methods = {dict(k)["method"] for k in s.series("ray_serve_num_http_requests_total")}
        assert methods == {"other"}, methods


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d.name))
    return out


def test_conversion_workers_leave_with_a_killed_gateway(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "proxy": {"port": 0}, "admin": {"port": 0}, "metrics": {"enabled": False},
        "http": {"enabled": True, "port": 0},
        "logging_config": {"logs_dir": str(tmp_path / "logs")},
        "applications": [text("/t")]}))
    proc = GatewayProcess(cfg)
    try:
        address = proc.wait_for(r"serving HTTP on (http://\S+)", 30)
        before = _children(proc.proc.pid)
        big = json.dumps({"text": "x" * 100_000}).encode()  # transcoded in a thread
        rows = [[1.0, 2.0, 3.0, "x"]] * 10_000  # an OIP body: a worker process
        bad = json.dumps({"inputs": [{"name": "f", "shape": [10_000, 4],
                                      "datatype": "FP32", "data": rows}]}).encode()
        assert requests.post(address + "/t" + PREDICT, data=big, timeout=30).ok
        r = requests.post(address + "/t/v2/models/m/infer", data=bad, timeout=30)
        assert r.status_code == 400 and "not a FP32 value" in r.json()["error"], r.text
        workers = _children(proc.proc.pid) - before
        assert workers, "no conversion worker was started"
        proc.proc.kill()
        proc.wait(30)
        for _ in range(100):  # bounded: the workers check their parent every second
            if not any(Path(f"/proc/{w}").exists() for w in workers):
                break
            time.sleep(0.1)
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.wait(30)


async def test_curl_expect_100_continue_is_answered(start_gateway: Any, tmp_path: Path) -> None:
    rows: list[Any] = [(5.1, 3.5, 1.4, 0.2)] * 100_000  # > 1 MiB: curl sends Expect
    rows[-1] = (1, 2, 3, "x")  # answered 400 once read: no model time in the figure
    body = tmp_path / "big.json"
    body.write_text(json.dumps(infer_body(rows)))
    assert body.stat().st_size > 2 << 20
    async with start_gateway([iris()], http=HTTP) as gw:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_starttransfer}",
            "--expect100-timeout", "20", "--max-time", "60", "--data-binary", f"@{body}",
            url(gw, INFER), stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
    code, _started = out.decode().split()
    # Without the interim answer curl waits out its expect timeout (20 s) and then sends;
    # --max-time 60 would still pass, so the timeout is what shows it: well under 20 s.
    assert code == "400", out
    assert float(_started) < 15, out
