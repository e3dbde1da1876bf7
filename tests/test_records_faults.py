"""The Arize path under a slow and flapping receiver (issue 10).

Calls stream into the record pipeline while the fake Arize receiver answers slowly, goes down
(cutting its connections) and comes back, and answers bursts of 503; then the pipeline stops.
Checked: no record lost (each one exported, failed or dropped with a reason, exactly once), no
record received twice unless an earlier send of it got no answer (delivery is at least once: a
send that timed out may have arrived), queues within their bounds, and the stop within its
grace.

`make faults` runs the long form (>= 60 s, marker `faults`); `make test` runs a short one.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3

from gateway.records.pipeline import RecordPipeline
from tests.fake_arize import FakeArize
from tests.test_records_exporters import arize_config, oip_call

QUEUE_SIZE = 500
BATCH_SIZE = 50
GRACE_S = 3.0


@pytest.fixture(autouse=True)
def _no_arize_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID", "ARIZE_API_HOST", "ARIZE_API_PORT",
                "ARIZE_API_SCHEME"):
        monkeypatch.delenv(var, raising=False)


def flap(fake: FakeArize, until: float, rng: random.Random, sample: object) -> collections.Counter[
        str]:
    """Slow, down, 503 bursts and healthy spells, in turn, until `until` (monotonic)."""
    phases: collections.Counter[str] = collections.Counter()
    while time.monotonic() < until:
        phase = rng.choice(["slow", "down", "burst", "healthy"])
        phases[phase] += 1
        span = min(rng.uniform(0.5, 2.0), max(0.0, until - time.monotonic()))
        if phase == "slow":
            fake.delay_s = rng.uniform(0.1, 0.4)  # well inside the 2 s timeout
        elif phase == "down":
            fake.stop()
        elif phase == "burst":
            fake.fail_next = rng.randint(5, 40)
        end = time.monotonic() + span
        while time.monotonic() < end:
            sample()  # type: ignore[operator]
            time.sleep(0.05)
        if phase == "down":
            fake.start()
        fake.delay_s = 0.0
    return phases


def run_slow_and_flapping_receiver(seconds: float, tmp: Path) -> None:
    fake = FakeArize().start()
    cfg = arize_config(fake.port, {"queue_size": QUEUE_SIZE, "batch_size": BATCH_SIZE},
                       timeout_s=2.0, max_retries=6, backoff_initial_s=0.05, backoff_max_s=0.5,
                       max_workers=4)
    pipeline = RecordPipeline(cfg, tmp)
    pipeline.start()
    worker = pipeline.workers["arize"]
    unanswered = watch_sends(worker.exporter)
    sent = 0
    stop = threading.Event()

    def feed() -> None:  # ~150 calls a second, from another thread, as the event loop would
        nonlocal sent
        while not stop.is_set():
            pipeline.observe(oip_call(f"f{sent}"))
            sent += 1
            time.sleep(0.006)

    depth = {"intake": 0, "queue": 0}

    def sample() -> None:
        depth["intake"] = max(depth["intake"], len(pipeline._intake))
        depth["queue"] = max(depth["queue"], worker.depth)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        phases = flap(fake, time.monotonic() + seconds, random.Random(10), sample)
    finally:
        stop.set()
        feeder.join(5)
    t0 = time.monotonic()
    done = threading.Thread(target=pipeline.shutdown, args=(GRACE_S,), daemon=True)
    done.start()
    done.join(GRACE_S + 10)
    took = time.monotonic() - t0
    fake.stop()
    assert not done.is_alive(), "the pipeline did not stop"
    assert took <= GRACE_S + 1.5, f"stopping took {took:.1f}s for a {GRACE_S}s grace"
    assert phases["down"] and phases["slow"], phases

    st = pipeline.stats["arize"]
    built = pipeline.records_built
    print(f"\n{seconds:.0f}s: calls {sent}, records {built}, exported {st.exported}, failed "
          f"{st.failed}, retries {st.retries}, dropped {dict(st.dropped)}, received "
          f"{len(fake.records())} of {fake.attempts} POSTs, phases {dict(phases)}, max depth "
          f"{depth}, stop took {took:.2f}s")
    # Each call is one record, or one counted drop before decoding.
    assert built + pipeline.calls_dropped["queue_full"] == sent
    # Each record is exactly one of: exported, failed, dropped (by reason).
    assert st.exported + st.failed + sum(st.dropped.values()) == built, (st, built)
    assert st.dropped["invalid"] == 0 and st.dropped["exporter_unavailable"] == 0
    got = collections.Counter(r.prediction_id for r in fake.records())
    # At least once: a send that ended without an answer (timed out, connection cut) may have
    # been received all the same, and its record is sent again. A second copy of a record
    # whose every earlier send was answered is a bug.
    twice = {pid: n for pid, n in got.items() if n > 1}
    print(f"records received more than once: {len(twice)}, all after a send that got no "
          f"answer: {sum(unanswered.values())} such sends")
    wrong = {pid: (n, unanswered[pid]) for pid, n in twice.items() if n - 1 > unanswered[pid]}
    assert not wrong, f"records received twice although answered: {wrong}"
    assert set(got) <= {f"f{i}:0" for i in range(sent)}
    # Only records in flight when the grace ran out may have arrived uncounted as exported.
    assert st.exported <= len(got) <= st.exported + st.dropped["shutdown"]
    assert st.exported > 0
    assert depth["intake"] <= QUEUE_SIZE and depth["queue"] <= QUEUE_SIZE + BATCH_SIZE, depth


def unanswered(f: Any) -> bool:
    """A send that ended without an answer although it may have reached the receiver (timed
    out, connection cut); a refused connection never did."""
    if f.cancelled() or f.exception() is None:
        return False
    e = f.exception()
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return not isinstance(reason, urllib3.exceptions.NewConnectionError)


def watch_sends(exporter: object) -> collections.Counter[str]:
    """Per prediction id, how many of its sends ended without an answer (`unanswered`)."""
    sender = exporter._sender  # type: ignore[attr-defined]
    send = sender._send
    out: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def watched(kw: dict[str, object]) -> object:
        fut = send(kw)
        pid = str(kw["prediction_id"])

        def ended(f: object) -> None:
            if unanswered(f):
                with lock:
                    out[pid] += 1
        fut.add_done_callback(ended)
        return fut

    sender._send = watched
    return out


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_arize_under_a_slow_and_flapping_receiver_for_a_minute(tmp_path: Path) -> None:
    run_slow_and_flapping_receiver(float(os.environ.get("FAULTS_SECONDS", "60")), tmp_path)


def test_arize_under_a_slow_and_flapping_receiver_briefly(tmp_path: Path) -> None:
    run_slow_and_flapping_receiver(6.0, tmp_path)


def test_a_send_answered_after_its_timeout_is_received_twice_and_exported_once(
        tmp_path: Path) -> None:
    """At least once, on purpose: the receiver takes the record but answers after timeout_s;
    the exporter cannot tell it arrived, sends it again, and counts it exported once."""
    with FakeArize() as fake:
        fake.delay_s = 2.0  # the first POST: taken, answered after the 0.5 s deadline
        cfg = arize_config(fake.port, timeout_s=0.5, max_retries=3, backoff_initial_s=0.3,
                           backoff_max_s=0.3, max_workers=1)
        pipeline = RecordPipeline(cfg, tmp_path)
        pipeline.start()
        sends = watch_sends(pipeline.workers["arize"].exporter)
        try:
            pipeline.observe(oip_call("late"))
            end = time.monotonic() + 10
            while fake.attempts < 1 and time.monotonic() < end:
                time.sleep(0.01)
            fake.delay_s = 0.0  # the retry is answered at once
            st = pipeline.stats["arize"]
            end = time.monotonic() + 20
            while (st.exported < 1 or len(fake.records()) < 2) and time.monotonic() < end:
                time.sleep(0.05)
            got = collections.Counter(r.prediction_id for r in fake.records())
            assert got == {"late:0": 2}, got
            assert st.exported == 1 and st.retries >= 1 and st.failed == 0, st
            assert sends["late:0"] == 1  # the one send whose answer never came
        finally:
            pipeline.shutdown(2.0)
