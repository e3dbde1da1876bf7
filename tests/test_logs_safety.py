"""Log lines a client cannot forge, log files that stay bounded, profiles that survive a
restart, and access lines that follow the application's own logging settings."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import grpc

from gateway.logs.access import access_record, emit_batch
from gateway.logs.context import ContextFilter, call_context
from gateway.logs.format import file_handler
from gateway.logs.profiling import memory_profiler
from gateway.logs.settings import LogSettings
from tests.test_logs import TEXT_LINE, chatty_app, predict, read_lines, wait_lines

HOSTILE = ["rid-1\nERROR 2026-01-01 00:00:00,000 - - - forged-line", "rid-2\x7f\x1b[31mRED",
           "x y", "rid-3\r\u2028z"]


def _logger(tmp_path: Path, name: str, **settings: Any) -> tuple[logging.Logger, Path]:
    path = tmp_path / f"{name}.log"
    h = file_handler(path, LogSettings(logs_dir=str(tmp_path), **settings))
    h.addFilter(ContextFilter("gateway", "app\nforged", "Dep\x1b[0m", "r#1"))
    logger = logging.getLogger(f"gateway.test_safety.{name}")
    logger.handlers = [h]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, path


def test_text_lines_escape_what_clients_and_models_sent(tmp_path: Path) -> None:
    logger, path = _logger(tmp_path, "text")
    for rid in HOSTILE:
        with call_context(rid, "/demo.text.TextModel/Predict\nINFO fake"):
            logger.info("request id %s from app %s", rid, "app\x1b[2J")
    access = logging.getLogger("gateway.test_safety.access")
    access.handlers = logger.handlers
    access.propagate = False
    access.setLevel(logging.INFO)
    records = [
        access_record(access, method="/m\nERROR forged",
                      code=grpc.StatusCode.OK, latency_s=0.001, end_time=0.0,
                      request_id=rid, application="a\nb", deployment="D", replica="r")
        for rid in HOSTILE
    ]
    emit_batch(access, [r for r in records if r is not None])
    for h in logger.handlers:
        h.close()
    raw = path.read_bytes()
    lines = raw.decode().split("\n")[:-1]
    assert len(lines) == 2 * len(HOSTILE), lines
    for line in lines:
        assert line.isprintable(), repr(line)
        m = TEXT_LINE.match(line)
        assert m, line
        assert m["request_id"].startswith("rid-") or m["request_id"] == "x\\x20y"
    assert b"\x1b" not in raw and b"\x7f" not in raw and b"\r" not in raw
    assert "rid-1\\nERROR" in raw.decode()


def test_rotation_without_backups_keeps_the_file_bounded(tmp_path: Path) -> None:
    logger, path = _logger(tmp_path, "rot", max_bytes=4000, backup_count=0)
    for i in range(400):
        logger.info("line %04d %s", i, "x" * 40)
    batch = [logger.makeRecord(logger.name, logging.INFO, "f", 1, "batch %d", (i,), None)
             for i in range(400)]
    emit_batch(logger, batch)
    for h in logger.handlers:
        h.close()
    assert path.stat().st_size <= 4000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rot.log"]
    assert "batch 399" in path.read_text()


def test_memory_profile_of_a_restart_with_the_same_pid(tmp_path: Path) -> None:
    env = {"GATEWAY_ENABLE_MEMORY_PROFILING": "1"}
    earlier = tmp_path / f"memray_gateway_{os.getpid()}.bin"
    earlier.write_bytes(b"the capture of an earlier run with this PID")
    with memory_profiler(tmp_path, "gateway", env) as path:
        assert path is not None and path != earlier
    assert earlier.read_bytes().startswith(b"the capture")
    assert path.exists()


async def test_applications_logging_config_governs_the_gateways_access_lines(
        start_gateway: Any) -> None:
    apps = [
        chatty_app("quiet", "Q", logging_config={"disable_access_log": True}),
        chatty_app("warn", "W", dep={"logging_config": {"log_level": "WARNING"}}),
        chatty_app("loud", "L"),
    ]
    async with start_gateway(apps) as gw:
        for app in ("quiet", "warn", "loud"):
            await predict(gw, f"acc-{app}", app=app)
        gw_log = gw.logs_dir / "gateway.log"
        await wait_lines(gw_log, lambda s: "acc-loud" in s)
        await asyncio.sleep(0.3)
        lines = read_lines(gw_log)
    assert [s for s in lines if "acc-loud" in s and " access - " in s]
    assert not [s for s in lines if "acc-quiet" in s], lines
    assert not [s for s in lines if "acc-warn" in s], lines
