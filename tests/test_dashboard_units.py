"""The dashboard's parts on their own: chart series and quantiles, the log reader, the process
table's bounds, the secret scrubber, the login helpers and the control loop."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gateway.config import parse_config
from gateway.control.loop import ControlLoop
from gateway.dashboard import auth, logview, processes
from gateway.dashboard.api import REDACTED, Scrubber
from gateway.dashboard.series import MAX_ROUTES, CallSeries, quantile


def rec(app: str = "a", dep: str = "D", code: grpc.StatusCode = grpc.StatusCode.OK,
        latency_s: float = 0.01) -> Any:
    return SimpleNamespace(application=app, deployment=dep, code=code, latency_s=latency_s)


def test_series_points_rates_errors_and_quantiles() -> None:
    s = CallSeries(step_s=1.0, window_s=10.0)
    for i in range(100):
        s.observe(rec(latency_s=(i + 1) / 1000.0))  # 1..100 ms
    s.observe(rec(code=grpc.StatusCode.UNAVAILABLE))
    s.observe(rec(app=""))  # not routed: not charted
    s._last_sample = time.monotonic() - 2.0
    s.sample([("a", "D"), ("b", "E")])
    (p,) = s.points("a", "D")
    assert p.calls_per_s == pytest.approx(101 / 2.0, rel=0.05)
    assert set(p.errors_per_s) == {"UNAVAILABLE"}
    assert p.p50_ms == pytest.approx(50, rel=0.1)
    assert p.p99_ms == pytest.approx(99, rel=0.1)
    assert s.points("a")[0].calls_per_s == pytest.approx(p.calls_per_s)
    # An idle deployment gets zero points, so its chart moves.
    (idle,) = s.points("b", "E")
    assert idle.calls_per_s == 0 and idle.p50_ms is None
    assert s.points("") == []


def test_series_are_bounded() -> None:
    s = CallSeries(step_s=1.0, window_s=5.0)
    for _ in range(20):
        s.sample([("a", "D")])
    assert len(s.points("a", "D")) == 5
    for i in range(MAX_ROUTES + 50):
        s.observe(rec(dep=f"d{i}"))
    assert len(s._current) == MAX_ROUTES


def test_quantile_of_an_empty_histogram_is_none() -> None:
    assert quantile([0, 0, 0], 0.5) is None


def write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


TEXT_LINE = ("{lvl} 2026-01-01 10:00:00,000 app Dep app#Dep#ab {rid} /m where.py:1 - {msg}")


def test_log_reader_parses_text_json_and_continuations(tmp_path: Path) -> None:
    f = tmp_path / "r.log"
    write(f, [
        TEXT_LINE.format(lvl="INFO", rid="r-1", msg="hello world"),
        TEXT_LINE.format(lvl="ERROR", rid="-", msg="boom"),
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        json.dumps({"levelname": "WARNING", "asctime": "t", "request_id": "r-2",
                    "message": "json line"}),
    ])
    out = logview.read(f)
    assert [e["level"] for e in out["entries"]] == ["INFO", "ERROR", "WARNING"]
    assert out["entries"][0]["request_id"] == "r-1"
    assert "Traceback" in out["entries"][1]["line"]
    assert out["offset"] == f.stat().st_size
    assert [e["level"] for e in logview.read(f, level="WARNING")["entries"]] == \
        ["ERROR", "WARNING"]
    assert [e["request_id"] for e in logview.read(f, query="r-2")["entries"]] == ["r-2"]
    # Following: only what came after the offset, whole lines only.
    with open(f, "a") as fh:
        fh.write(TEXT_LINE.format(lvl="INFO", rid="r-3", msg="later") + "\nINFO partial")
    more = logview.read(f, after=out["offset"])
    assert [e["request_id"] for e in more["entries"]] == ["r-3"]
    assert logview.read(f, after=more["offset"])["entries"] == []
    assert logview.read(tmp_path / "none.log")["exists"] is False


def test_log_reader_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "big.log"
    line = TEXT_LINE.format(lvl="INFO", rid="r", msg="x" * 200)
    write(f, [line] * 20000)  # ~5 MB
    out = logview.read(f, limit=100000)
    assert 0 < len(out["entries"]) <= logview.MAX_LINES and out["truncated"]
    assert f.stat().st_size - out["start"] <= logview.MAX_READ_BYTES
    short = TEXT_LINE.format(lvl="INFO", rid="r", msg="")
    write(f, [short] * 20000)  # short lines: the line cap binds before the byte cap
    assert len(logview.read(f, limit=100000)["entries"]) == logview.MAX_LINES
    assert all(e["level"] == "INFO" for e in out["entries"])  # no half line at the start
    # A rotated (shrunk) file is read from its tail again.
    write(f, [line])
    assert len(logview.read(f, after=10**9)["entries"]) == 1


def test_process_table_keeps_dead_ones_a_while_and_bounded() -> None:
    table = processes.ProcessTable(None, lambda rid: Path(f"/logs/{rid}.log"))
    for i in range(processes.MAX_DEAD + 10):
        slot = SimpleNamespace(replica_id=f"a#D#{i}", application="a", deployment="D",
                               process=SimpleNamespace(pid=100000 + i, returncode=None),
                               state=SimpleNamespace(value="STARTING"), message="",
                               failures=0)
        table.on_replica_event("started", slot)  # type: ignore[arg-type]
        slot.process.returncode = -9
    table.tick()
    dead = [p for p in table.all() if not p.alive]
    assert len(dead) == processes.MAX_DEAD
    assert all(p.exit_code == -9 and p.died_at for p in dead)
    assert table.recent(dead[-1].name)[-1].event == "process exited"
    for p in dead:
        p.died_at = time.time() - processes.DEAD_KEEP_S - 1
    table.tick()
    assert [p.kind for p in table.all()] == ["gateway"]


def test_events_are_bounded_and_repeated_checks_fold() -> None:
    table = processes.ProcessTable(None, lambda rid: Path("x"))
    slot = SimpleNamespace(replica_id="a#D#1", application="a", deployment="D", process=None,
                           state=SimpleNamespace(value="RUNNING"), message="", failures=0)
    for _ in range(500):
        table.on_replica_event("checked", slot)  # type: ignore[arg-type]
    assert len(table.recent("a#D#1")) == 1
    for i in range(500):
        slot.message = f"m{i}"
        table.on_replica_event("unhealthy", slot)  # type: ignore[arg-type]
    assert len(table.recent("a#D#1")) == processes.MAX_EVENTS


def test_scrubber_removes_every_configured_secret() -> None:
    cfg = parse_config({"admin": {"token": "admin-tok-1"},
                        "records": {"arize": {"api_key": "ak-2222", "space_id": "sp-3333"}},
                        "metrics": {"otlp": {"headers": {"x-key": "hdr-4444"}}}})
    scrub = Scrubber(cfg)
    text = "ak-2222 and sp-3333 and admin-tok-1 and hdr-4444"
    assert scrub(text) == " and ".join([REDACTED] * 4)
    data = scrub.data({"user": {"password": "p", "max_tokens": 5, "note": "ak-2222"}})
    assert data == {"user": {"password": REDACTED, "max_tokens": 5, "note": REDACTED}}
    assert "ak-2222" not in json.dumps(scrub.data(cfg.model_dump(mode="python")), default=str)


def test_login_helpers() -> None:
    assert auth.authorized(None, "", "")
    assert auth.authorized("t", "Bearer t", "")
    assert not auth.authorized("t", "Bearer x", "")
    assert auth.authorized("t", "", auth.session_value("t"))
    assert not auth.authorized("t", "", "t")  # the cookie is not the token
    assert auth.safe_next("//evil.example/") == "/"
    assert auth.safe_next("https://evil.example/") == "/"
    assert auth.safe_next("/apps/x?y=1") == "/apps/x?y=1"
    assert auth.host_ok("127.0.0.1:8265", "127.0.0.1")
    assert auth.host_ok("localhost", "127.0.0.1")
    assert auth.host_ok("[::1]:8265", "::1")
    assert not auth.host_ok("evil.example:8265", "127.0.0.1")
    assert not auth.host_ok("", "127.0.0.1")


async def test_control_loop_counts_times_and_survives_a_failing_step() -> None:
    loop = ControlLoop(interval_s=0.01)
    calls: list[int] = []

    def bad() -> None:
        raise RuntimeError("step broke")

    loop.add(bad)
    loop.add(lambda: calls.append(1))
    reader = InMemoryMetricReader()
    loop.register_metrics(MeterProvider(metric_readers=[reader]))
    loop.start()
    for _ in range(200):
        if loop.num_loops >= 5:
            break
        await asyncio.sleep(0.01)
    await loop.stop()
    assert loop.num_loops >= 5 and len(calls) == loop.num_loops
    data = reader.get_metrics_data()
    assert data is not None
    found = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    loops_point = next(iter(found["ray_serve_controller_num_control_loops"].data.data_points))
    assert loops_point.value == loop.num_loops
    assert loops_point.attributes == {"actor_id": loop.actor_id}
    assert "ray_serve_controller_control_loop_duration_s" in found


def test_records_shown_are_bounded() -> None:
    from gateway.dashboard import MAX_RECORD_CHARS, records_snapshot

    big = SimpleNamespace(to_dict=lambda: {"features": {f"f{i}": i for i in range(5000)}})
    small = SimpleNamespace(to_dict=lambda: {"prediction_id": "p1"})
    stats = SimpleNamespace(last_error="boom", last_error_at=1.0, recent=[big, small])
    pipeline = SimpleNamespace(
        snapshot=lambda: {"exporters": {"jsonl": {"exported": 1}}}, stats={"jsonl": stats})
    entry = records_snapshot(pipeline)["exporters"]["jsonl"]
    assert entry["last_error"] == "boom"
    assert len(entry["recent"][0]) == MAX_RECORD_CHARS + 1
    assert entry["recent"][1] == {"prediction_id": "p1"}


def test_tick_samples_only_when_due() -> None:
    s = CallSeries(step_s=60.0, window_s=600.0)
    asked: list[int] = []

    def routes() -> list[tuple[str, str]]:
        asked.append(1)
        return [("a", "D")]

    s.tick(routes)
    assert asked == [] and s.points("a", "D") == []  # not due yet: routes not even listed
    s._next_due = 0.0
    s.tick(routes)
    assert asked == [1] and len(s.points("a", "D")) == 1
