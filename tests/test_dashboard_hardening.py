"""Regression tests for the dashboard's hardening (issue 14's review): the Host guard, slow and
many clients, the log search and its bounds, forged log lines, the replica's print capture and
the login helpers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from gateway.config import parse_config
from gateway.dashboard import auth, logview
from gateway.dashboard.api import REDACTED, Scrubber
from gateway.ingress.http_limits import MAX_CONNECTIONS, ConnectionLimits
from gateway.logs.format import TextFormatter
from gateway.logs.replica import LINE_CAP, _LineWriter
from tests.dashboard_support import get_json, stop_gateway
from tests.ops_support import GatewayProcess


@pytest.mark.parametrize("host", [
    "127.evil.example", "127.0.0.1.evil.example:8265", "127.attacker.test", "127.1.evil",
    "localhost.evil.example", "0x7f.evil", "[::1].evil",
])
def test_host_guard_refuses_names_that_only_look_loopback(host: str) -> None:
    assert not auth.host_ok(host, "127.0.0.1")


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.0.0.1:8265", "127.1.2.3:80", "localhost:8265", "LOCALHOST", "[::1]:8265",
    "[::ffff:127.0.0.1]:1",
])
def test_host_guard_accepts_loopback_literals_and_localhost(host: str) -> None:
    assert auth.host_ok(host, "127.0.0.1")


def test_host_guard_accepts_the_configured_host() -> None:
    assert auth.host_ok("dash.internal:8265", "dash.internal")
    assert not auth.host_ok("other.internal:8265", "dash.internal")


# -- the log search sees only scrubbed lines; the replica does not inherit the Arize keys ----

KEY = "ak-7f3e9c1d2b"


def _text_line(rid: str, message: str, request_id: str = "-") -> str:
    return (f"INFO 2026-11-27 08:00:00,000 text Chatty {rid} {request_id} /Predict model.py:9 - "
            f"{message}\n")


def test_log_search_runs_on_scrubbed_lines(tmp_path: Path) -> None:
    f = tmp_path / "r.log"
    f.write_text(_text_line("r1", f"env: ARIZE_API_KEY={KEY} HOME=/root"))
    scrub = Scrubber(parse_config({"records": {"arize": {"api_key": KEY, "space_id": "s-123"}},
                                   "applications": []}))
    # A guess at the key's first characters matches nothing: the search sees what is shown.
    for guess in ("ARIZE_API_KEY=ak-", "ARIZE_API_KEY=a", KEY):
        assert logview.read(f, query=guess, scrub=scrub)["entries"] == [], guess
    (e,) = logview.read(f, query="ARIZE_API_KEY=" + REDACTED, scrub=scrub)["entries"]
    assert KEY not in e["line"] and KEY not in e["message"]


def test_replica_processes_do_not_inherit_the_arize_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "proxy": {"host": "127.0.0.1", "port": 0}, "admin": {"port": 0},
        "dashboard": {"enabled": True, "port": 0},
        "logging_config": {"logs_dir": str(tmp_path / "logs")},
        "records": {"jsonl_path": str(tmp_path / "records.jsonl")},
        "applications": [{"name": "text", "deployments": [
            {"name": "Chatty", "import_path": "tests.ops_support:Chatty", "num_replicas": 1}]}]}))
    gp = GatewayProcess(cfg, env={**os.environ, "ARIZE_API_KEY": KEY,
                                  "ARIZE_SPACE_ID": "space-1234", "KEEP_ME": "yes"})
    try:
        url = gp.wait_for(r"dashboard on (\S+)", 10)
        gp.wait_for(r"application 'text': (RUNNING)", 30)
        apps = get_json(url + "/api/serve/applications/")
        (rep,) = apps["applications"]["text"]["deployments"]["Chatty"]["replicas"]
        environ = Path(f"/proc/{rep['pid']}/environ").read_bytes().split(b"\0")
        names = {v.split(b"=", 1)[0] for v in environ}
        assert b"ARIZE_API_KEY" not in names and b"ARIZE_SPACE_ID" not in names
        assert b"KEEP_ME=yes" in environ  # the rest of the environment is passed on
    finally:
        stop_gateway(gp)


# -- a bounded window per request, with paging ----------------------------------------------

def test_log_read_is_a_bounded_window_with_paging(tmp_path: Path) -> None:
    f = tmp_path / "big.log"
    line = _text_line("r1", "x" * 300, "req-%06d")
    with open(f, "w") as out:
        for i in range(3000):  # ~1 MB
            out.write(line % i)
    size = f.stat().st_size
    first = logview.read(f, limit=100000)
    assert len(first["entries"]) <= logview.MAX_LINES
    assert first["truncated"] is True
    assert size - first["start"] <= logview.MAX_READ_BYTES
    assert first["offset"] == size
    assert first["entries"][-1]["request_id"] == "req-002999"
    # Paging back: the window before `start`, ending where the first one began.
    older = logview.read(f, before=first["start"], limit=100000)
    assert older["offset"] == first["start"]
    seen = int(older["entries"][-1]["request_id"][4:])
    assert seen + 1 == int(first["entries"][0]["request_id"][4:])
    pages, before, page = 0, first["start"], first
    while before > 0 and pages < 20:
        page = logview.read(f, before=before)
        before = page["start"]
        pages += 1
    assert before == 0 and not page["truncated"]
    assert page["entries"][0]["request_id"] == "req-000000"


def test_following_says_when_it_skipped_lines(tmp_path: Path) -> None:
    f = tmp_path / "r.log"
    f.write_text(_text_line("r1", "first", "rid-0"))
    offset = logview.read(f)["offset"]
    assert not logview.read(f, after=offset)["truncated"]
    with open(f, "a") as out:
        out.write(_text_line("r1", "x" * 400, "rid-1") * 1000)  # > MAX_READ_BYTES
    page = logview.read(f, after=offset)
    assert page["truncated"] and page["offset"] == f.stat().st_size


def test_log_api_answers_json_built_off_the_loop(tmp_path: Path) -> None:
    f = tmp_path / "r.log"
    f.write_text(_text_line("r1", "hello", "rid-1"))
    data = json.loads(logview.read_json(f, query="rid-1"))
    assert [e["request_id"] for e in data["entries"]] == ["rid-1"]


# -- forged log lines -----------------------------------------------------------------------

FORGED = ("x\nERROR 2026-11-27 08:00:00,000 classifier Iris classifier#Iris#abcdef victim-req-1 "
          "/ModelInfer model.py:1 - FORGED: replica out of memory")


def test_a_newline_in_an_exception_message_does_not_forge_a_log_entry(tmp_path: Path) -> None:
    try:
        raise ValueError(f"bad input {FORGED}")
    except ValueError:
        rec = logging.LogRecord("gateway.replica", logging.ERROR, "mux_server.py", 242,
                                "servicer method %s raised", ("Predict",), sys.exc_info())
    for text in (FORGED, "{\"levelname\": \"ERROR\", \"message\": \"FORGED\"}"):
        rec.exc_text = None
        rec.exc_info = (ValueError, ValueError(f"bad input x\n{text}"), None)
        f = tmp_path / "r.log"
        f.write_text(TextFormatter().format(rec) + "\n")
        (entry,) = logview.read(f)["entries"]
        assert entry["level"] == "ERROR" and entry["request_id"] == ""
        assert "FORGED" in entry["message"]
        assert [e["request_id"] for e in logview.read(f, query="victim-req-1")["entries"]] \
            in ([], [""])


# -- a replica's prints without newlines ------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _writer() -> tuple[_LineWriter, _Collect]:
    logger = logging.getLogger("test.linewriter")
    logger.propagate = False
    logger.handlers[:] = []
    h = _Collect()
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    return _LineWriter(logger, logging.INFO, None), h


def test_line_writer_caps_a_partial_line_and_keeps_the_text() -> None:
    w, h = _writer()
    for _ in range(2000):  # 400,000 characters, no newline
        assert w.write("." * 200) == 200
    assert all(len(line) == LINE_CAP for line in h.lines)
    assert len(h.lines) == 400_000 // LINE_CAP
    assert w._held < LINE_CAP
    w.write("end\nnext\n\nlast")
    w.flush()
    text = "".join(h.lines[:-3])
    assert len(text) == 400_000 + 3 and text.endswith("...end")
    assert h.lines[-3:] == ["next", "", "last"]


def test_line_writer_splits_an_overlong_line() -> None:
    w, h = _writer()
    w.write("a" * (LINE_CAP * 2 + 5) + "\nb\n")
    assert [len(x) for x in h.lines] == [LINE_CAP, LINE_CAP, 5, 1]


# -- slow clients and too many connections ----------------------------------------------------

async def _limited_server(limits: ConnectionLimits) -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            await request.read()
        return web.Response(text="hi")

    app = web.Application(middlewares=[limits.middleware])
    app.router.add_get("/", hello)
    app.router.add_post("/", hello)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    limits.install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; fails if it did not close in time."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_a_half_sent_request_head_is_dropped_after_the_header_timeout() -> None:
    limits = ConnectionLimits(max_connections=8, header_timeout_s=0.5, request_timeout_s=1.0)
    runner, port = await _limited_server(limits)
    try:
        # Nothing at all, half a head, a head sent a line at a time past the timeout.
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await _closed_within(r1, 5.0)
        await _closed_within(r2, 5.0)
        # A body that never completes: cut after the request timeout.
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        w3.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        await _closed_within(r3, 5.0)
        assert limits.timed_out == 3 and limits.open == 0
        # A prompt client is served, and its idle keep-alive connection closed later.
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        w4.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(r4.readuntil(b"hi"), 5.0)
        assert head.startswith(b"HTTP/1.1 200")
        await _closed_within(r4, 5.0)
        for w in (w1, w2, w3, w4):
            w.close()
    finally:
        await runner.cleanup()


async def test_connections_past_the_cap_get_503_and_are_closed() -> None:
    limits = ConnectionLimits(max_connections=3, header_timeout_s=30.0)
    runner, port = await _limited_server(limits)
    held = []
    try:
        for _ in range(3):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        for _ in range(50):  # bounded: until the server has counted all three
            if limits.open == 3:
                break
            await asyncio.sleep(0.02)
        assert limits.open == 3
        r, w = await asyncio.open_connection("127.0.0.1", port)
        answer = await _closed_within(r, 5.0)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
        assert limits.refused == 1
        w.close()
        # One held connection goes: a new client is served again.
        held.pop()[1].close()
        for _ in range(50):
            if limits.open == 2:
                break
            await asyncio.sleep(0.02)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _closed_within(r, 5.0)).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        for _, hw in held:
            hw.close()
        await runner.cleanup()


def test_the_dashboard_server_uses_the_limits() -> None:
    from gateway.dashboard.server import DashboardServer

    api = SimpleNamespace(overview=dict, processes=dict, records_view=dict)
    server = DashboardServer(api, "127.0.0.1", 0, lambda: None)  # type: ignore[arg-type]
    assert server.limits.max_connections == MAX_CONNECTIONS
    assert server.app().middlewares[0] == server.limits.middleware


def test_a_request_id_search_matches_exactly(tmp_path: Path) -> None:
    f = tmp_path / "r.log"
    f.write_text(_text_line("r1", "one", "req-1") + _text_line("r1", "ten", "req-10")
                 + _text_line("r1", "mentions req-1 in text"))
    assert [e["message"] for e in logview.read(f, query="req-1")["entries"]] == ["one"]
    assert len(logview.read(f, query="req-")["entries"]) == 3  # not an id: text search


# -- login: sessions expire, failed logins are limited, `next` stays on the site --------------

def test_session_cookie_expires_and_is_signed() -> None:
    now = 1_800_000_000.0
    cookie = auth.session_value("tok", now)
    assert auth.session_ok("tok", cookie, now + 60)
    assert not auth.session_ok("tok", cookie, now + auth.SESSION_TTL_S + 1)
    assert not auth.session_ok("other", cookie, now + 60)
    issued, _, mac = cookie.partition(".")
    assert not auth.session_ok("tok", f"{int(issued) + 3600}.{mac}", now + 60)  # moved on
    for bad in ("", ".", "x.y", "123", "-5.ab", "9" * 40 + ".ab"):
        assert not auth.session_ok("tok", bad, now)
    assert auth.authorized("tok", "", auth.session_value("tok"))


def test_failed_logins_are_limited_globally() -> None:
    t = [0.0]
    fl = auth.FailedLogins(limit=3, window_s=10.0, clock=lambda: t[0])
    for _ in range(3):
        assert fl.allow()
        fl.failed()
    assert not fl.allow() and fl.retry_after_s() >= 1
    t[0] = 10.5
    assert fl.allow()


@pytest.mark.parametrize("target", [
    "/\t/evil.example", "/\n/evil.example", "/\r/evil.example", "/\x0b/evil.example",
    "/\x0c/evil.example", "/ /evil.example", "/\x00", "/\u2028/evil.example",
])
def test_safe_next_refuses_control_characters_and_whitespace(target: str) -> None:
    assert auth.safe_next(target) == "/"
