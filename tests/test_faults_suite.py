"""The fault suite: each case runs under a steady, bounded load (tests/fault_harness.py) and
reports calls sent, OK, failed by status and the time to recover; `make faults` runs the long
forms (marker `faults`) and prints one table of every case; `make test` runs the short forms.

Cases: a local replica SIGKILLed, a local replica hung (SIGSTOP, then SIGCONT), an external
replica black-holed and refused by a TCP relay (two replicas, and one), the Arize receiver
down with records at 100%, logs_dir full (a small tmpfs) and read-only, SIGTERM under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from gateway.control.state import ReplicaSlot
from gateway.dataplane.replicas import ReplicaState
from gateway.logs import write_errors
from tests.conftest import TEXT_APP, external_replica, gateway_config, running_gateway
from tests.fake_arize import FakeArize
from tests.fault_harness import RESULTS, Relay, SteadyLoad
from tests.test_records import KEY, SPACE, scrape

LONG = pytest.mark.faults
FAST_HEALTH = {"health_check_period_s": 0.3, "health_check_timeout_s": 1.0}
"""Quick to notice a fault; not so quick that a loaded machine (2 cores, the suite running
beside other work) fails health checks of replicas that are fine."""


def text_app(replicas: int = 2, **dep: Any) -> dict[str, Any]:
    d = {**TEXT_APP["deployments"][0], "num_replicas": replicas, **FAST_HEALTH, **dep}
    return {**TEXT_APP, "deployments": [d]}


async def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {what} within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def slots(gw: Any) -> list[ReplicaSlot]:
    return list(gw.controller.apps["text"].ingress.slots)


# -- local replicas ----------------------------------------------------------------------


async def sigkill_case(tmp_path: Path, settle_s: float) -> None:
    config = gateway_config([text_app()], tmp_path)
    async with running_gateway(config, tmp_path) as gw:
        load = SteadyLoad(gw.address, rate=50, sleep_s=0.05).start()
        await load.wait_ok(20, 0, 20)
        victim = slots(gw)[0]
        assert victim.replica is not None and victim.replica.pid
        starts = victim.starts
        fault = time.monotonic()
        os.kill(victim.replica.pid, signal.SIGKILL)
        back = await until(lambda: victim.starts > starts
                           and victim.state is ReplicaState.RUNNING, 30, "restarted")
        await asyncio.sleep(settle_s)
        await load.stop()
    res = load.summary("local replica SIGKILL", fault, f"restarted and RUNNING in {back:.1f}s")
    RESULTS.append(res)
    failed = load.failures_since(fault)
    # Only the calls in flight on it (at most the load's concurrency) fail, at once.
    assert len(failed) <= load.max_in_flight, res
    assert all(c[0] <= fault + 0.5 for c in failed), res
    assert {c[2] for c in failed} <= {"UNAVAILABLE", "INTERNAL", "UNKNOWN"}, res
    assert load.ok_after(fault + back) > 0


async def test_local_replica_sigkill(tmp_path: Path) -> None:
    await sigkill_case(tmp_path, 1.0)


@LONG
async def test_local_replica_sigkill_long(tmp_path: Path) -> None:
    await sigkill_case(tmp_path, 20.0)


async def sigstop_case(tmp_path: Path, hang_s: float) -> None:
    config = gateway_config([text_app()], tmp_path)
    async with running_gateway(config, tmp_path) as gw:
        load = SteadyLoad(gw.address, rate=50, deadline_s=1.0).start()
        await load.wait_ok(20, 0, 20)
        victim = slots(gw)[0]
        assert victim.replica is not None and victim.replica.pid
        pid = victim.replica.pid
        fault = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            out = await until(lambda: victim.state is ReplicaState.UNHEALTHY, 10, "UNHEALTHY")
            await asyncio.sleep(hang_s)
            assert victim.state is ReplicaState.UNHEALTHY
        finally:
            os.kill(pid, signal.SIGCONT)
        cont = time.monotonic()
        back = await until(lambda: victim.state is ReplicaState.RUNNING, 15, "RUNNING again")
        await asyncio.sleep(1.0)
        await load.stop()
    res = load.summary("local replica hung (SIGSTOP / SIGCONT)", fault,
                       f"out of rotation in {out:.1f}s; back {back:.1f}s after SIGCONT")
    RESULTS.append(res)
    period, timeout = FAST_HEALTH["health_check_period_s"], FAST_HEALTH["health_check_timeout_s"]
    failed = load.failures_since(fault)
    assert {c[2] for c in failed} <= {"DEADLINE_EXCEEDED"}, res
    # Traffic moved off it within health_check_timeout + period (and a call's deadline).
    assert out <= timeout + period + 1.5, res
    assert all(c[0] <= fault + timeout + period + 1.5 for c in failed), res
    assert load.ok_after(cont + back) > 0


async def test_local_replica_hung(tmp_path: Path) -> None:
    await sigstop_case(tmp_path, 1.0)


@LONG
async def test_local_replica_hung_long(tmp_path: Path) -> None:
    await sigstop_case(tmp_path, 30.0)


# -- external replicas -------------------------------------------------------------------


async def external_case(tmp_path: Path, two: bool, hold_s: float) -> None:
    async with contextlib.AsyncExitStack() as stack:
        _, port_a = await stack.enter_async_context(external_replica())
        relay = await Relay(port_a).start()
        stack.push_async_callback(relay.close)
        targets = [f"127.0.0.1:{relay.port}"]
        if two:
            _, port_b = await stack.enter_async_context(external_replica())
            targets.append(f"127.0.0.1:{port_b}")
        dep = {"name": "Ext", "targets": targets, **FAST_HEALTH}
        config = gateway_config([{"name": "text", "deployments": [dep]}], tmp_path)
        gw = await stack.enter_async_context(running_gateway(config, tmp_path))
        load = SteadyLoad(gw.address, rate=50, deadline_s=1.0).start()
        await load.wait_ok(20, 0, 20)
        via_relay = slots(gw)[0]
        fault = time.monotonic()
        relay.blackhole()
        out = await until(lambda: via_relay.state is ReplicaState.UNHEALTHY, 10, "UNHEALTHY")
        await asyncio.sleep(hold_s)
        blackholed = load.summary("", fault)
        refused_at = time.monotonic()
        await relay.refuse()
        await asyncio.sleep(hold_s)
        await load.stop()
    n = "two external replicas" if two else "one external replica"
    res_bh = load.summary(f"{n}: one black-holed", fault, f"out of rotation in {out:.1f}s")
    res_bh.sent, res_bh.ok, res_bh.failed = blackholed.sent, blackholed.ok, blackholed.failed
    after = [c for c in load.calls if c[0] >= refused_at]
    res_ref = load.summary(f"{n}: one refused", refused_at)
    res_ref.sent = len(after)
    res_ref.ok = sum(1 for c in after if c[2] == "OK")
    res_ref.failed = {}
    for c in after:
        if c[2] != "OK":
            res_ref.failed[c[2]] = res_ref.failed.get(c[2], 0) + 1
    slowest = max((c[1] - c[0] for c in after if c[2] != "OK"), default=0.0)
    res_ref.note = f"slowest failed call {slowest:.2f}s"
    RESULTS.extend([res_bh, res_ref])
    failed_bh = [c for c in load.failures_since(fault) if c[0] < refused_at]
    period, timeout = FAST_HEALTH["health_check_period_s"], FAST_HEALTH["health_check_timeout_s"]
    late = [f"+{t - fault:.2f}s {d}" for t, d in load.details
            if fault + timeout + period + 1.5 < t < refused_at]
    print("\nfailed after the replica left rotation:", *late[:10], sep="\n  ")
    assert out <= timeout + period + 1.5, res_bh
    assert all(c[0] <= fault + timeout + period + 1.5 for c in failed_bh) or not two, res_bh
    if two:
        # Calls moved to the other replica: after the move, none failed.
        assert res_ref.failed == {} and res_ref.ok > 0, res_ref
    else:
        # Nowhere to go: refused fast, never after minutes.
        assert res_ref.ok == 0 and slowest <= 1.5, res_ref
        assert set(res_ref.failed) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, res_ref


async def test_external_replica_blackholed_and_refused_two(tmp_path: Path) -> None:
    await external_case(tmp_path, True, 1.0)


async def test_external_replica_blackholed_and_refused_one(tmp_path: Path) -> None:
    await external_case(tmp_path, False, 1.0)


@LONG
async def test_external_replica_blackholed_and_refused_two_long(tmp_path: Path) -> None:
    await external_case(tmp_path, True, 20.0)


@LONG
async def test_external_replica_blackholed_and_refused_one_long(tmp_path: Path) -> None:
    await external_case(tmp_path, False, 20.0)


# -- the Arize receiver ------------------------------------------------------------------

MAPPING = {"features": ["text"], "prediction_label": "label", "prediction_score": "score"}


async def arize_down_case(tmp_path: Path, down_s: float) -> None:
    fake = FakeArize().start()
    # Default health checks: this case is about the records path, not about replicas.
    app = {**text_app(health_check_period_s=2.0, health_check_timeout_s=2.0),
           "prediction_records": {
        "enabled": True, "sample_rate": 1.0, "exporters": ["arize"], "field_mapping": MAPPING}}
    records = {"arize": {"api_key": KEY, "space_id": SPACE, "api_scheme": "http",
                         "api_host": fake.host, "api_port": fake.port, "timeout_s": 1,
                         "max_retries": 1, "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
               "flush_interval_s": 0.05, "queue_size": 2000}
    proc = psutil.Process()
    rss: list[int] = []
    try:
        config = gateway_config([app], tmp_path, records=records)
        async with running_gateway(config, tmp_path) as gw:
            load = SteadyLoad(gw.address, rate=40).start()
            await load.wait_ok(20, 0, 20)
            await asyncio.to_thread(fake.wait_for, 10, 20)
            fault = time.monotonic()
            fake.stop()
            end = fault + down_s
            while time.monotonic() < end:
                rss.append(proc.memory_info().rss)
                await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            dropped = {k: v for k, v in gw.records.snapshot()["calls_dropped"].items() if v}
            exporters = gw.records.snapshot().get("exporters", {})
            before = len(fake.records())
            fake.start()
            back = time.monotonic()
            await until(lambda: len(fake.records()) > before, 30, "records flowing again")
            flowing = time.monotonic() - back
            await load.stop()
    finally:
        fake.stop()
    mib = [r / 2**20 for r in rss]
    res = load.summary(f"Arize receiver down {down_s:g}s (records 100%)", fault,
                       f"RSS {min(mib):.0f}-{max(mib):.0f} MiB; records again "
                       f"{flowing:.1f}s after it returned; drops {dropped or '-'}")
    RESULTS.append(res)
    assert res.failed == {}, res
    assert max(mib) - min(mib) < 200, res
    assert exporters or dropped is not None


async def test_arize_receiver_down_briefly(tmp_path: Path) -> None:
    await arize_down_case(tmp_path, 10.0)


@LONG
@pytest.mark.timeout(1200)
async def test_arize_receiver_down_ten_minutes(tmp_path: Path) -> None:
    await arize_down_case(tmp_path, float(os.environ.get("FAULTS_ARIZE_DOWN_S", "600")))


# -- logs_dir ----------------------------------------------------------------------------


def _root_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for logs_dir needs root")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb") as f:
        for _ in range(256):
            f.write(b"\0" * 4096)
            f.flush()


def _umount_all(path: Path) -> None:
    for _ in range(3):  # the tmpfs, and the read-only one on top of it
        if subprocess.run(["umount", "-l", str(path)], capture_output=True,
                          timeout=30).returncode != 0:
            return


async def logs_dir_case(tmp_path: Path, hold_s: float, capfd: pytest.CaptureFixture[str]
                        ) -> None:
    _root_or_skip()
    logs = tmp_path / "logs"
    logs.mkdir()
    _sh("mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(logs))
    try:
        app = {**text_app(), "prediction_records": {
            "enabled": True, "sample_rate": 1.0, "exporters": ["jsonl"],
            "field_mapping": MAPPING}}
        # Small files (a few tmpfs pages: appends need new pages on the full disk): rotation
        # opens new ones, which a read-only logs_dir refuses.
        config = gateway_config([app], tmp_path, records={"flush_interval_s": 0.05},
                                logging_config={"logs_dir": str(logs), "max_bytes": 16000,
                                                "backup_count": 1})
        async with running_gateway(config, tmp_path) as gw:
            load = SteadyLoad(gw.address, rate=50).start()
            await load.wait_ok(20, 0, 20)
            lost_before = write_errors.total()
            fault = time.monotonic()
            # Fill the disk, and keep it full (a rotation frees what the old backup held).
            end = time.monotonic() + hold_s
            n = 0
            while time.monotonic() < end:
                n += 1
                _fill(logs / f"filler-{n}")
                await asyncio.sleep(0.1)
            full_lost = write_errors.total() - lost_before
            ro_at = time.monotonic()
            for i in range(1, n + 1):
                (logs / f"filler-{i}").unlink()
            # Read-only from now on: a read-only tmpfs over it (files already open keep
            # writing to the one below until they rotate; new files are refused).
            _sh("umount", "-l", str(logs))
            _sh("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(logs))
            await asyncio.sleep(max(hold_s, 4.0))  # long enough for a file to rotate
            ro_lost = write_errors.total() - lost_before - full_lost
            await load.stop()
            await asyncio.to_thread(gw.records.flush, 5.0)
            jsonl = gw.records.snapshot()["exporters"]["jsonl"]
            assert gw.metrics_port
            scraped = await asyncio.to_thread(scrape, gw.metrics_port)
        err = capfd.readouterr().err
    finally:
        _umount_all(logs)
    res = load.summary("logs_dir full (tmpfs 512k), then read-only", fault,
                       f"log lines lost: {full_lost} full, {ro_lost} read-only "
                       f"({dict(write_errors.FAILURES)}); JSONL records exported "
                       f"{jsonl['exported']}, failed {jsonl['failed']}")
    RESULTS.append(res)
    assert res.failed == {}, res
    assert full_lost > 0 and ro_lost > 0, res
    assert "ENOSPC" in write_errors.FAILURES and "EROFS" in write_errors.FAILURES
    dropped_series = r'grpc_gateway_log_lines_dropped_total\{[^}]*reason="ENOSPC"[^}]*\} [1-9]'
    assert re.search(dropped_series, scraped)
    said = [ln for ln in err.splitlines() if "cannot write the log file" in ln]
    # Once per file and reason, not once per line.
    assert 0 < len(said) <= 8, said
    assert "Traceback" not in err
    # JSONL records likewise: failures counted, the exporter alive (it exported before).
    assert jsonl["failed"] > 0 and jsonl["exported"] > 0, jsonl
    assert ro_at > fault


async def test_logs_dir_full_and_read_only(tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    await logs_dir_case(tmp_path, 1.5, capfd)


@LONG
async def test_logs_dir_full_and_read_only_long(tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    await logs_dir_case(tmp_path, 15.0, capfd)


# -- SIGTERM under load ------------------------------------------------------------------


@LONG
def test_sigterm_under_load(tmp_path: Path) -> None:
    """The draining test's scenario (tests/test_draining.py, in `make test` too), counted."""
    from tests.test_draining import Load, start

    gp = start(tmp_path)
    load = Load(gp.address)
    try:
        load.start()
        time.sleep(2.0)
        fault = time.monotonic()
        gp.proc.send_signal(signal.SIGTERM)
        rc = gp.wait(60)
        stopped = time.monotonic() - fault
        load.join()
    finally:
        load.stop.set()
        gp.kill()
    from tests.fault_harness import CaseResult

    failed = {"UNAVAILABLE (refused: draining / closed)": len(load.refused)}
    if load.lost:
        failed["lost after being accepted"] = len(load.lost)
    RESULTS.append(CaseResult(
        "SIGTERM under load", len(load.ok) + len(load.refused) + len(load.lost), len(load.ok),
        failed, None, f"exit {rc} after {stopped:.1f}s; accepted calls lost: {len(load.lost)}"))
    assert rc == 0 and load.lost == [], load.lost
