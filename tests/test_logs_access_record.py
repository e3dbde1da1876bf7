"""The access log's cheap records: the same LogRecord logging itself would make, and the same
date text, whatever second a line falls in."""

from __future__ import annotations

import logging
import time

import grpc

from gateway.logs.access import access_record
from gateway.logs.format import JsonFormatter, TextFormatter


def _made_by_logging(logger: logging.Logger, level: int, end: float) -> logging.LogRecord:
    route = "/bench.Echo/Echo"
    rec = logger.makeRecord(
        logger.name, level, "access", 0, "%s %s %.1fms", (route, "OK", 12.3), None,
        extra={"access": True, "method": route, "status": "OK", "latency_ms": 12.3,
               "request_id": "rid-1", "route": route, "application": "a", "deployment": "D",
               "replica": "a#D#x"})
    rec.created = end
    rec.msecs = (end - int(end)) * 1000
    return rec


def test_access_record_has_every_attribute_logging_would_give_it() -> None:
    logger = logging.getLogger("test.access.record")
    logger.setLevel(logging.INFO)
    end = time.time()
    ours = access_record(logger, method="/bench.Echo/Echo", code=grpc.StatusCode.OK,
                         latency_s=0.0123, end_time=end, request_id="rid-1",
                         application="a", deployment="D", replica="a#D#x")
    assert ours is not None
    theirs = _made_by_logging(logger, logging.INFO, end)
    assert set(ours.__dict__) == set(theirs.__dict__)
    for key in ("name", "msg", "levelno", "levelname", "pathname", "lineno", "process",
                "thread", "exc_info", "stack_info", "created", "msecs", "method", "route",
                "status", "request_id", "application", "deployment", "replica", "access"):
        assert ours.__dict__[key] == theirs.__dict__[key], key
    assert ours.getMessage() == "/bench.Echo/Echo OK 12.3ms"
    assert TextFormatter().format(ours) == TextFormatter().format(theirs)
    assert JsonFormatter().format(ours) == JsonFormatter().format(theirs)


def test_records_do_not_share_their_fields() -> None:
    logger = logging.getLogger("test.access.shared")
    logger.setLevel(logging.INFO)
    a = access_record(logger, method="/a", code=grpc.StatusCode.OK, latency_s=0.001,
                      end_time=1.0, request_id="r1", application="x", deployment="X",
                      replica="x#X#1")
    b = access_record(logger, method="/b", code=grpc.StatusCode.UNAVAILABLE, latency_s=0.002,
                      end_time=2.0, request_id="r2", application="y", deployment="Y",
                      replica="y#Y#2")
    assert a is not None and b is not None
    assert (a.request_id, a.levelname, a.route) == ("r1", "INFO", "/a")  # type: ignore[attr-defined]
    assert (b.request_id, b.levelname, b.route) == ("r2", "WARNING", "/b")  # type: ignore[attr-defined]
    logger.setLevel(logging.WARNING)
    assert access_record(logger, method="/a", code=grpc.StatusCode.OK, latency_s=0.001,
                         end_time=1.0, request_id="r", application="x", deployment="X",
                         replica="r") is None


def test_text_date_follows_each_records_second() -> None:
    fmt = TextFormatter()
    logger = logging.getLogger("test.access.date")
    logger.setLevel(logging.INFO)
    base = 1_700_000_000.25
    for t in (base, base + 0.5, base + 1.0, base - 3600.0, base + 86_400.75, base):
        rec = access_record(logger, method="/m", code=grpc.StatusCode.OK, latency_s=0.0,
                            end_time=t, request_id="r", application="a", deployment="D",
                            replica="a#D#1")
        assert rec is not None
        want = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(rec.msecs):03d}"
        assert fmt.format(rec).split(" ", 1)[1].startswith(want)


def test_fields_that_need_escaping_are_escaped_and_plain_ones_kept() -> None:
    logger = logging.getLogger("test.access.fields")
    logger.setLevel(logging.INFO)
    rec = access_record(logger, method="/svc/M", code=grpc.StatusCode.OK, latency_s=0.0,
                        end_time=1.0, request_id="id with space\nINFO forged\x1b[31m",
                        application="app", deployment="", replica="r#D#1")
    assert rec is not None
    line = TextFormatter().format(rec)
    assert "\n" not in line and "\x1b" not in line
    fields = line.split(" ")[3:8]
    assert fields == ["app", "-", "r#D#1", "id\\x20with\\x20space\\nINFO\\x20forged\\x1b[31m",
                      "/svc/M"]
