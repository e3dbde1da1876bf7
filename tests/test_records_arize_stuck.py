"""Arize sends stuck on a receiver that trickles its answer one byte at a time, forever
(issue 10, follow-up): `requests`' timeout bounds each read only, so without an overall
deadline per request such a send never ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from gateway.records.pipeline import RecordPipeline
from tests.fake_arize import FakeArize
from tests.test_records_exporters import arize_config, oip_call

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_arize_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID", "ARIZE_API_HOST", "ARIZE_API_PORT",
                "ARIZE_API_SCHEME"):
        monkeypatch.delenv(var, raising=False)


def wait(cond: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


CHILD = textwrap.dedent("""
    import os, sys, tempfile, time, pathlib
    os.environ["ARIZE_LOG_ENABLE"] = "false"
    sys.path.insert(0, {root!r})
    from gateway.records.pipeline import RecordPipeline
    from tests.test_records_exporters import arize_config, oip_call
    # timeout_s far beyond the grace: only the shutdown can end the stuck sends.
    cfg = arize_config(int(sys.argv[1]), timeout_s=60, max_retries=1, max_workers=4)
    p = RecordPipeline(cfg, pathlib.Path(tempfile.mkdtemp()))
    p.start()
    for i in range(8):
        p.observe(oip_call(f"stuck-{{i}}"))
    sys.stdin.readline()  # the parent says when the sends are stuck
    print("stopping", flush=True)
    p.shutdown(2.0)
    print("stopped", flush=True)
""")


def test_a_process_with_stuck_arize_sends_exits_within_the_grace(tmp_path: Path) -> None:
    """SIGTERM-like stop of a pipeline whose sends trickle forever: the interpreter must exit
    (the SDK's non-daemon pool threads are joined at exit) within the grace plus a little."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    with FakeArize() as fake:
        fake.trickle_next = 10_000
        proc = subprocess.Popen([sys.executable, str(script), str(fake.port)], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "ARIZE_LOG_ENABLE": "false"})
        try:
            assert wait(lambda: fake.trickled >= 4, 30), "the sends never reached the receiver"
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "stopping"
            t0 = time.monotonic()
            try:
                rc = proc.wait(2.0 + 8.0)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {time.monotonic() - t0:.0f} s after the stop "
                            "(grace 2 s): a stuck Arize send holds the process")
            assert rc == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_stuck_sends_end_and_later_records_are_delivered(tmp_path: Path) -> None:
    """The first 4 POSTs (as many as the SDK has threads) trickle forever: they must end
    at the deadline (retried), and every record, later ones included, reach Arize."""
    with FakeArize() as fake:
        fake.trickle_next = 4
        cfg = arize_config(fake.port, timeout_s=1, max_retries=5, backoff_initial_s=0.05,
                           backoff_max_s=0.3, max_workers=4)
        p = RecordPipeline(cfg, tmp_path)
        p.start()
        try:
            for i in range(20):
                p.observe(oip_call(f"later-{i}"))
                time.sleep(0.05)
            assert wait(lambda: len(fake.by_prediction_id()) >= 20, 40), (
                f"{len(fake.by_prediction_id())} of 20 record(s) delivered after "
                f"{fake.trickled} stuck send(s): delivery stopped")
            st = p.stats["arize"]
            assert wait(lambda: st.exported == 20, 10), st
            assert st.retries >= 1  # the stuck ones ended and were sent again
        finally:
            p.shutdown(2.0)


def test_records_stuck_at_shutdown_are_all_counted(tmp_path: Path) -> None:
    """Every record built ends up exported, failed or dropped, also when its send is stuck
    when the gateway stops."""
    with FakeArize() as fake:
        fake.trickle_next = 10_000
        cfg = arize_config(fake.port, {"queue_size": 1000, "batch_size": 50}, timeout_s=1,
                           max_retries=3, backoff_initial_s=0.05, backoff_max_s=0.3,
                           max_workers=4)
        p = RecordPipeline(cfg, tmp_path)
        p.start()
        for i in range(20):
            p.observe(oip_call(f"acct-{i}"))
        time.sleep(3.0)
        p.flush(2.0)
        stopper = threading.Thread(target=p.shutdown, args=(2.0,), daemon=True)
        stopper.start()
        stopper.join(15)
        assert not stopper.is_alive()
        st = p.stats["arize"]
        assert p.records_built == 20
        counted = st.exported + st.failed + sum(st.dropped.values())
        assert counted == 20, (st, dict(st.dropped))


def test_sends_still_running_when_the_gateway_stops_are_counted_dropped() -> None:
    """The accounting alone, with sends that never end (the per-request deadline makes these
    rare; a stand-in future plays one): set aside as stuck, then counted dropped at the stop."""
    import concurrent.futures as cf

    from exporters.records.arize_send import Sender
    from tests.test_records_exporters import arize, predictions

    never: list[cf.Future[object]] = []

    def stuck(kwargs: dict[str, object]) -> cf.Future[object]:
        fut: cf.Future[object] = cf.Future()
        fut.set_running_or_notify_cancel()  # running: it cannot be cancelled any more
        never.append(fut)
        return fut

    with FakeArize() as fake:
        exporter = arize(fake, max_retries=0)
        exporter._sender = Sender(stuck, 8, stall_s=0.3)
        first = exporter.export(predictions(3))
        assert exporter.outstanding() == 3  # set aside, not counted yet
        exporter.begin_shutdown(time.monotonic() + 0.3)
        last = exporter.export([])
        exporter.shutdown(500)
    counted = sum(r.exported + r.failed + r.dropped + r.invalid for r in (first, last))
    assert counted == 3, (first, last)
    assert exporter.outstanding() == 0
