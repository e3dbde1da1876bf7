"""Structured logs: TEXT and JSON lines of the gateway and a replica, field by field, with the
client's request id; per-deployment overrides; access log off; rotation."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.app import Gateway
from gateway.config import LoggingConfig, parse_config
from gateway.logs.access import AccessLog
from gateway.logs.context import call_context
from gateway.logs.format import JsonFormatter, TextFormatter
from gateway.logs.settings import replica_log_file, replica_logging_config, resolve
from gateway.pb import text_model_pb2
from tests.conftest import md, text_stub
from tests.ops_support import PREDICT

TEXT_LINE = re.compile(
    r"^(?P<level>[A-Z]+) (?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<application>\S+) "
    r"(?P<deployment>\S+) (?P<replica>\S+) (?P<request_id>\S+) (?P<route>\S+) (?P<where>\S+) - "
    r"(?P<message>.*)$"
)


def chatty_app(name: str = "text", dep_name: str = "Chatty",
               dep: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An application of one `Chatty` deployment; `dep` adds deployment keys."""
    d = {"name": dep_name, "import_path": "tests.ops_support:Chatty", "num_replicas": 1}
    d.update(dep or {})
    return {"name": name, "deployments": [d], **extra}


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_lines(path: Path, pred: Callable[[str], bool], n: int = 1,
                     timeout: float = 10.0) -> list[str]:
    """Lines of `path` matching `pred`, once there are `n` (the access log is written async)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in read_lines(path) if pred(line)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def predict(gw: Gateway, rid: str, app: str = "text", text: str = "good") -> Any:
    async with grpc.aio.insecure_channel(gw.address) as ch:
        return await text_stub(ch).Predict(
            text_model_pb2.PredictRequest(text=text), metadata=md(app, x_request_id=rid),
            timeout=10,
        )


def replica_file(gw: Gateway, replica_id: str) -> Path:
    assert gw.logs_dir is not None
    return replica_log_file(gw.logs_dir, replica_id)


def check_timestamp(asctime: str) -> None:
    t = datetime.datetime.strptime(asctime, "%Y-%m-%d %H:%M:%S,%f")
    assert abs((datetime.datetime.now() - t).total_seconds()) < 120


# -- real gateways -----------------------------------------------------------------------


async def test_json_lines_of_gateway_and_replica(start_gateway: Any) -> None:
    rid = "json-req-0001"
    async with start_gateway([chatty_app()], logging_config={"encoding": "JSON"}) as gw:
        resp = await predict(gw, rid)
        gateway_lines = await wait_lines(gw.logs_dir / "gateway.log", lambda s: rid in s)
        rfile = replica_file(gw, resp.replica)
        await wait_lines(rfile, lambda s: rid in s, n=4)

    assert len(gateway_lines) == 1, gateway_lines
    g = json.loads(gateway_lines[0])
    assert g["levelname"] == "INFO"
    check_timestamp(g["asctime"])
    assert g["timestamp"].endswith("Z")
    assert g["application"] == "text"
    assert g["deployment"] == "Chatty"
    assert g["replica"] == resp.replica
    assert g["request_id"] == rid
    assert g["route"] == PREDICT
    assert g["component"] == "gateway"
    assert g["logger"] == "gateway.access"
    assert g["method"] == PREDICT and g["status"] == "OK"
    assert g["latency_ms"] > 0
    assert g["message"] == f"{PREDICT} OK {g['latency_ms']:.1f}ms"

    # Every line of the replica's file is one JSON object.
    records = [json.loads(line) for line in read_lines(rfile)]
    mine = [r for r in records if r["request_id"] == rid]
    by_logger = {r["logger"]: r for r in mine}
    assert set(by_logger) == {"gateway.access", "chatty", "gateway.replica.stdout"}, mine
    for r in mine:
        assert r["application"] == "text"
        assert r["deployment"] == "Chatty"
        assert r["replica"] == resp.replica
        assert r["route"] == PREDICT
        assert r["component"] == "replica"
        check_timestamp(r["asctime"])
    assert by_logger["gateway.access"]["status"] == "OK"
    assert by_logger["gateway.access"]["message"].startswith(f"{PREDICT} OK ")
    chatty = [r for r in mine if r["logger"] == "chatty"]
    assert [r["message"] for r in chatty] == ["hello from the model: good",
                                              "a warning from the model"]
    assert chatty[0]["filename"] == "ops_support.py"
    assert by_logger["gateway.replica.stdout"]["message"] == "printed by the model: good"
    assert [r["levelname"] for r in mine if r["logger"] == "chatty"] == ["INFO", "WARNING"]
    # The replica's access line and the gateway's: one grep follows the request through both.
    assert g["pid"] != by_logger["gateway.access"]["pid"]


async def test_text_lines_of_gateway_and_replica(start_gateway: Any) -> None:
    rid = "text-req-0002"
    async with start_gateway([chatty_app()]) as gw:  # TEXT is the default
        resp = await predict(gw, rid, text="bad")
        gateway_lines = await wait_lines(gw.logs_dir / "gateway.log", lambda s: rid in s)
        replica_lines = await wait_lines(replica_file(gw, resp.replica), lambda s: rid in s, n=4)

    m = TEXT_LINE.match(gateway_lines[0])
    assert m, gateway_lines[0]
    assert m["level"] == "INFO"
    check_timestamp(m["date"])
    assert (m["application"], m["deployment"], m["replica"]) == ("text", "Chatty", resp.replica)
    assert m["request_id"] == rid and m["route"] == PREDICT
    assert re.fullmatch(rf"{re.escape(PREDICT)} OK \d+\.\dms", m["message"])

    parsed = [TEXT_LINE.match(line) for line in replica_lines]
    assert all(parsed), replica_lines
    msgs = {p["message"] for p in parsed if p}
    assert "hello from the model: bad" in msgs
    assert "printed by the model: bad" in msgs
    assert any(re.fullmatch(rf"{re.escape(PREDICT)} OK \d+\.\dms", s) for s in msgs)
    for p in parsed:
        assert p is not None
        assert (p["application"], p["deployment"], p["replica"]) == ("text", "Chatty",
                                                                      resp.replica)
        assert p["request_id"] == rid and p["route"] == PREDICT
    where = {p["message"]: p["where"] for p in parsed if p}
    assert re.fullmatch(r"ops_support\.py:\d+", where["hello from the model: bad"])


async def test_generated_request_id_is_logged_at_both_ends(start_gateway: Any) -> None:
    async with start_gateway([chatty_app()], logging_config={"encoding": "JSON"}) as gw:
        async with grpc.aio.insecure_channel(gw.address) as ch:
            call = text_stub(ch).Predict(text_model_pb2.PredictRequest(text="x"),
                                         metadata=md("text"), timeout=10)
            resp = await call
            rid = dict(await call.trailing_metadata())["x-request-id"]
        g = await wait_lines(gw.logs_dir / "gateway.log", lambda s: rid in s)
        r = await wait_lines(replica_file(gw, resp.replica),
                             lambda s: rid in s and "gateway.access" in s)
    assert len(rid) == 36  # a UUID made by the gateway
    assert json.loads(g[0])["request_id"] == rid
    assert json.loads(r[0])["request_id"] == rid


async def test_failed_call_is_logged_with_its_status(start_gateway: Any) -> None:
    rid = "fail-req-0003"
    async with start_gateway([chatty_app()], logging_config={"encoding": "JSON"}) as gw:
        async with grpc.aio.insecure_channel(gw.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await text_stub(ch).Predict(
                    text_model_pb2.PredictRequest(text="x", fail_code=5),
                    metadata=md("text", x_request_id=rid), timeout=10)
            # An unknown application: the gateway answers itself, no replica involved.
            with pytest.raises(grpc.aio.AioRpcError):
                await text_stub(ch).Predict(
                    text_model_pb2.PredictRequest(text="x"),
                    metadata=md("nope", x_request_id="unrouted-1"), timeout=10)
        lines = await wait_lines(gw.logs_dir / "gateway.log", lambda s: '"gateway.access"' in s,
                                 n=2)
    recs = [json.loads(s) for s in lines]
    failed = next(r for r in recs if r["request_id"] == rid)
    assert failed["status"] == "NOT_FOUND" and failed["levelname"] == "WARNING"
    assert failed["application"] == "text" and failed["replica"]
    unrouted = next(r for r in recs if r["request_id"] != rid)
    assert unrouted["status"] == "NOT_FOUND" and unrouted["levelname"] == "WARNING"
    assert unrouted["application"] == "" and unrouted["replica"] == ""
    assert unrouted["route"] == PREDICT


async def test_deployment_logging_config_overrides_application(start_gateway: Any) -> None:
    apps = [
        # The application says JSON at WARNING; its deployment overrides with TEXT at INFO.
        chatty_app("a", "A", logging_config={"encoding": "JSON", "log_level": "WARNING"},
                   dep={"logging_config": {"encoding": "TEXT", "log_level": "INFO"}}),
        # Same application settings without an override.
        chatty_app("b", "B", logging_config={"encoding": "JSON", "log_level": "WARNING"}),
    ]
    async with start_gateway(apps) as gw:
        ra = await predict(gw, "ovr-a", app="a")
        rb = await predict(gw, "ovr-b", app="b")
        a_lines = await wait_lines(replica_file(gw, ra.replica), lambda s: "ovr-a" in s, n=4)
        b_lines = await wait_lines(replica_file(gw, rb.replica), lambda s: "ovr-b" in s, n=1)
        await asyncio.sleep(0.3)  # anything else would have arrived by now
        b_lines = [s for s in read_lines(replica_file(gw, rb.replica)) if "ovr-b" in s]

    a = [TEXT_LINE.match(s) for s in a_lines]
    assert all(a), a_lines
    assert {"INFO", "WARNING"} <= {m["level"] for m in a if m}
    b = [json.loads(s) for s in b_lines]
    # WARNING level: the model's warning only; no INFO log, no print, no access line.
    assert [(r["logger"], r["levelname"]) for r in b] == [("chatty", "WARNING")], b


def test_merge_order_deployment_over_application_over_gateway() -> None:
    cfg = parse_config({
        "logging_config": {"log_level": "DEBUG", "encoding": "JSON", "max_bytes": 10},
        "applications": [chatty_app("a", "A", logging_config={"log_level": "ERROR"},
                                    dep={"logging_config": {"encoding": "TEXT"}})],
    })
    merged = replica_logging_config(cfg, "a", "A")
    assert (merged.log_level, merged.encoding, merged.max_bytes) == ("ERROR", "TEXT", 10)
    assert replica_logging_config(cfg, "missing", "X") == cfg.logging_config


async def test_access_log_off(start_gateway: Any) -> None:
    rid = "off-req-0004"
    async with start_gateway(
        [chatty_app(logging_config={"disable_access_log": True})],
        logging_config={"disable_access_log": True, "encoding": "JSON"},
    ) as gw:
        assert gw.logging.access is None
        resp = await predict(gw, rid)
        rfile = replica_file(gw, resp.replica)
        lines = await wait_lines(rfile, lambda s: rid in s, n=3)
        await asyncio.sleep(0.3)
        gw_log = read_lines(gw.logs_dir / "gateway.log")
        lines = [s for s in read_lines(rfile) if rid in s]
    assert not [s for s in gw_log if rid in s]
    assert gw_log, "the gateway's own lines are still written"
    loggers = sorted(json.loads(s)["logger"] for s in lines)
    # The model's own lines keep the request id; no access line.
    assert loggers == ["chatty", "chatty", "gateway.replica.stdout"], lines


async def test_rotation_from_environment_produces_backups(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ROTATION_MAX_BYTES", "3000")
    monkeypatch.setenv("RAY_ROTATION_BACKUP_COUNT", "2")
    async with start_gateway([chatty_app()]) as gw:
        assert gw.logging.settings.max_bytes == 3000
        replica = ""
        for i in range(60):
            replica = (await predict(gw, f"rot-{i:04d}")).replica
        await wait_lines(gw.logs_dir / "gateway.log", lambda s: "rot-0059" in s)
        await wait_lines(replica_file(gw, replica), lambda s: "rot-0059" in s, n=4)
        logs_dir = gw.logs_dir
    for base in (logs_dir / "gateway.log", replica_file(gw, replica)):
        names = sorted(p.name for p in logs_dir.glob(base.name + "*"))
        assert names == [base.name, base.name + ".1", base.name + ".2"], names
        for p in logs_dir.glob(base.name + "*"):
            assert p.stat().st_size <= 3000
        assert any("rot-0059" in s for s in read_lines(base))


def test_rotation_settings_config_over_environment() -> None:
    env = {"RAY_ROTATION_MAX_BYTES": "1234", "RAY_ROTATION_BACKUP_COUNT": "7"}
    s = resolve(LoggingConfig(), "/tmp/x", env)
    assert (s.max_bytes, s.backup_count) == (1234, 7)
    s = resolve(LoggingConfig(max_bytes=99, backup_count=1), "/tmp/x", env)
    assert (s.max_bytes, s.backup_count) == (99, 1)
    s = resolve(None, "/tmp/x", {"RAY_ROTATION_MAX_BYTES": "lots"})
    assert s.max_bytes == 512 * 1024 * 1024  # unusable value: Ray's default, with a warning


# -- formatting and the access-log thread ------------------------------------------------


def _record(msg: str, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.x", logging.ERROR, "/a/b/mod.py", 7, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_formatters_carry_exceptions_and_blank_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = _record("failed", application="app")
        rec.exc_info = sys.exc_info()
    text = TextFormatter().format(rec)
    first, *rest = text.splitlines()
    assert first.startswith("ERROR ") and first.endswith(" app - - - - mod.py:7 - failed")
    assert "ValueError: boom" in rest[-1]
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["message"] == "failed" and obj["application"] == "app"
    assert obj["request_id"] == "" and "ValueError: boom" in obj["exc_info"]


def test_call_context_sets_request_id_and_route() -> None:
    from gateway.logs.context import ContextFilter

    flt = ContextFilter("replica", "app", "Dep", "app#Dep#abc")
    rec = _record("hi")
    with call_context("rid-9", "/x.Y/Z"):
        flt.filter(rec)
    assert (rec.request_id, rec.route, rec.replica) == ("rid-9", "/x.Y/Z", "app#Dep#abc")
    outside = _record("hi")
    flt.filter(outside)
    assert outside.request_id == ""


def test_access_log_formats_off_the_calling_thread() -> None:
    handled: list[logging.LogRecord] = []
    formatted: list[int] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handled.append(record)

    logger = logging.getLogger("gateway.test_access")
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)

    def to_record(item: int) -> logging.LogRecord:
        formatted.append(item)
        return logger.makeRecord(logger.name, logging.INFO, "f", 1, "item %d", (item,), None)

    async def calls() -> None:
        # A long interval: nothing is written until close(), so the bound is what decides.
        access = AccessLog(logger, to_record, max_pending=50, interval_s=30)
        try:
            for i in range(80):
                access(i)
            assert handled == [] and formatted == []  # the call path only queued
            assert access.dropped == 30
        finally:
            access.close()
        assert access.written == 50

        # With a short interval the loop's timer writes the batch by itself.
        quick = AccessLog(logger, to_record, interval_s=0.01)
        quick(1000)
        assert handled[-1].getMessage() == "item 49"
        await asyncio.sleep(0.1)
        assert handled[-1].getMessage() == "item 1000" and quick.written == 1

    try:
        asyncio.run(calls())
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handled] == [f"item {i}" for i in range(50)] + ["item 1000"]


def test_promtail_example_reads_fields_our_json_lines_have() -> None:
    import yaml

    from tests.ops_support import REPO

    cfg = yaml.safe_load((REPO / "examples" / "promtail-config.yaml").read_text())
    stages = cfg["scrape_configs"][0]["pipeline_stages"]
    expressions = next(s["json"]["expressions"] for s in stages if "json" in s)
    line = json.loads(JsonFormatter().format(_record("x")))
    assert set(expressions.values()) <= set(line)
    labels = next(s["labels"] for s in stages if "labels" in s)
    assert "request_id" not in labels  # unbounded: a filter, never a label
    ts = next(s["timestamp"] for s in stages if "timestamp" in s)
    datetime.datetime.fromisoformat(line[expressions[ts["source"]]])
