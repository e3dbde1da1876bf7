"""Record exporters under pressure (issue 10): the real arize SDK against the fake receiver,
the JSONL file on a full disk, and exporters that two names resolve to."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from exporters.records.arize import ArizeExporter
from exporters.records.base import ActualRecord, ExporterContext, PredictionRecord
from exporters.records.jsonl import JsonlExporter
from gateway.config import GatewayConfig, parse_config
from gateway.dataplane.proxy import CallRecord
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.records.pipeline import RecordPipeline
from tests.conftest import IRIS_APP
from tests.fake_arize import FakeArize
from tests.test_records_units import call_record

KEY = "ak-EXP-5d2a770b-DO-NOT-LOG"
SPACE = "space-exp-77"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_arize_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID", "ARIZE_API_HOST", "ARIZE_API_PORT",
                "ARIZE_API_SCHEME"):
        monkeypatch.delenv(var, raising=False)


def arize(fake: FakeArize, **settings: Any) -> ArizeExporter:
    base = {"api_key": KEY, "space_id": SPACE, "api_scheme": "http", "api_host": fake.host,
            "api_port": fake.port, "timeout_s": 2, "max_retries": 3, "backoff_initial_s": 0.02,
            "backoff_max_s": 0.1}
    return ArizeExporter({}, ExporterContext(Path("."), {**base, **settings}))


def predictions(n: int, prefix: str = "p") -> list[PredictionRecord]:
    return [PredictionRecord(prediction_id=f"{prefix}-{i}", model_name="m",
                             prediction_timestamp=int(time.time()), prediction_label="a")
            for i in range(n)]


def oip_call(rid: str, rows: int = 1) -> CallRecord:
    """A finished Open Inference call of `rows` rows, as the proxy hands it over."""
    req = pb.ModelInferRequest(model_name="iris", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[rows, 2],
        contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0] * rows))])
    resp = pb.ModelInferResponse(model_name="iris", outputs=[
        pb.ModelInferResponse.InferOutputTensor(
            name="label", datatype="BYTES", shape=[rows],
            contents=pb.InferTensorContents(bytes_contents=[b"a"] * rows))])
    return call_record(req.SerializeToString(), resp.SerializeToString(), rid=rid)


def arize_config(port: int, records: dict[str, Any] | None = None,
                 **arize_extra: Any) -> GatewayConfig:
    a = {"api_key": KEY, "space_id": SPACE, "api_scheme": "http", "api_host": "127.0.0.1",
         "api_port": port, **arize_extra}
    return parse_config({"records": {"arize": a, "flush_interval_s": 0.01, **(records or {})},
                         "applications": [{**IRIS_APP, "prediction_records": {"enabled": True}}]})


def in_thread(fn: Any, *args: Any, timeout: float) -> tuple[bool, Any]:
    """Run `fn` on a daemon thread; (returned in time, result)."""
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(r=fn(*args)), daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("r")


def ids_received(fake: FakeArize) -> collections.Counter[str]:
    return collections.Counter(r.prediction_id for r in fake.records())


# -- item 1: a batch larger than the SDK's queue ------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_batch_larger_than_the_sdk_queue_never_deadlocks(workers: int) -> None:
    with FakeArize() as fake:
        ex = arize(fake, max_workers=workers)
        for round_ in range(3):  # the deadlock came at random: several batches
            recs = predictions(400, f"b{round_}")
            returned, res = in_thread(ex.export, recs, timeout=60)
            assert returned, "export() blocked on the SDK's queue"
            assert res.exported == 400 and res.ok, res
        assert len(fake.records()) == 1200 and max(ids_received(fake).values()) == 1
        returned, _ = in_thread(ex.shutdown, 0, timeout=5)
        assert returned, "shutdown(0) blocked"


def test_shutdown_of_a_busy_exporter_is_bounded_and_counts_what_did_not_go() -> None:
    with FakeArize() as fake:
        fake.delay_s = 0.2  # 100 records over 2 workers: ~10 s, far past the grace
        cfg = arize_config(fake.port, max_workers=2, timeout_s=2)
        pipeline = RecordPipeline(cfg, Path("."))
        pipeline.start()
        for i in range(100):
            pipeline.observe(oip_call(f"s{i}"))
        time.sleep(1.0)
        t0 = time.monotonic()
        returned, _ = in_thread(pipeline.shutdown, 1.0, timeout=10)
        took = time.monotonic() - t0
        assert returned and took < 1.0 + 1.5, f"shutdown took {took:.1f}s"
        st = pipeline.stats["arize"]
        assert st.dropped["invalid"] == 0 and st.failed == 0
        assert st.dropped["shutdown"] > 0
        # Every record is accounted for once; in-flight ones at the deadline may have arrived.
        assert st.exported + st.dropped["shutdown"] == 100
        got = ids_received(fake)
        assert max(got.values()) == 1
        assert st.exported <= len(got) <= st.exported + 2 * 2


# -- item 2: a slow receiver never gets a record twice --------------------------------------------


def test_a_slow_receiver_never_gets_a_record_twice() -> None:
    with FakeArize() as fake:
        fake.delay_s = 0.6  # inside the 0.7 s timeout, but 20 records take 3 s over 4 workers
        ex = arize(fake, timeout_s=0.7, max_retries=1, backoff_initial_s=0.01,
                   backoff_max_s=0.01)
        res = ex.export(predictions(20))
        assert res.exported == 20 and res.ok and res.retries == 0, res
        time.sleep(1.0)  # anything sent twice would arrive meanwhile
        got = ids_received(fake)
        assert len(got) == 20 and max(got.values()) == 1 and fake.attempts == 20
        ex.shutdown()


# -- item 4: a numeric actual of 0 ---------------------------------------------------------------


def test_a_numeric_actual_of_zero_reaches_arize() -> None:
    with FakeArize() as fake:
        ex = arize(fake, max_retries=0)
        recs = [ActualRecord(prediction_id=f"a-{v}", model_name="m", model_type="REGRESSION",
                             actual_label=str(v), actual_score=v) for v in (0.0, 0.5)]
        res = ex.export([*recs, ActualRecord(prediction_id="c-0", model_name="m",
                                             actual_label=None, actual_score=0.0)])
        assert res.exported == 3 and res.ok, res
        got = {r.prediction_id: r for r in fake.records()}
        assert got["a-0.0"].actual.actual_label.numeric == 0.0
        assert got["a-0.5"].actual.actual_label.numeric == 0.5
        assert got["a-0.0"].actual.HasField("actual_label")
        ex.shutdown()


# -- item 10: records being retried at shutdown --------------------------------------------------


def test_records_retried_at_shutdown_are_dropped_for_shutdown_not_invalid() -> None:
    fake = FakeArize().start()
    port = fake.port
    fake.stop()  # down: every record is retried with backoff
    cfg = arize_config(port, timeout_s=1, max_retries=50, backoff_initial_s=0.2,
                       backoff_max_s=0.5)
    pipeline = RecordPipeline(cfg, Path("."))
    pipeline.start()
    for i in range(10):
        pipeline.observe(oip_call(f"d{i}"))
    worker = pipeline.workers["arize"]
    deadline = time.monotonic() + 10
    while worker._busy < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker._busy == 10  # the batch is in export(), being retried
    time.sleep(0.8)
    returned, _ = in_thread(pipeline.shutdown, 0.5, timeout=5)
    assert returned
    st = pipeline.stats["arize"]
    assert st.dropped["invalid"] == 0 and st.exported == 0 and st.failed == 0
    assert st.dropped["shutdown"] == 10


# -- item 5: two names, one exporter --------------------------------------------------------------


def test_two_names_for_one_exporter_send_each_record_once(tmp_path: Path) -> None:
    cfg = parse_config({"records": {"flush_interval_s": 0.02}, "applications": [
        {**IRIS_APP, "prediction_records": {"enabled": True, "exporters": ["default", "jsonl"]}}]})
    pipeline = RecordPipeline(cfg, tmp_path)
    pipeline.start()
    try:
        for i in range(3):
            pipeline.observe(oip_call(f"req-{i}"))
        assert pipeline.log_actuals("classifier", [
            {"prediction_id": "req-0:0", "actual_label": "a"}])[0] == 1
        assert pipeline.flush(10)
    finally:
        pipeline.shutdown(2)
    lines = [json.loads(s) for s in (tmp_path / "records.jsonl").read_text().splitlines()]
    kinds = collections.Counter(d["kind"] for d in lines)
    assert kinds == {"prediction": 3, "actual": 1}
    assert pipeline.stats["jsonl"].exported == 4


# -- item 9: the JSONL file -----------------------------------------------------------------------


def test_jsonl_failed_write_leaves_no_partial_line(tmp_path: Path) -> None:
    # In a child process: the file size limit (a "full disk") must not touch the test run.
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from exporters.records.jsonl import JsonlExporter
        from exporters.records.base import ExporterContext, PredictionRecord
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        d = Path({str(tmp_path)!r})
        ex = JsonlExporter({{"max_bytes": 0}}, ExporterContext(d))
        def batch(k):
            return [PredictionRecord(prediction_id=f"b{{k}}-{{i}}", model_name="m",
                    prediction_timestamp=1, features={{"t": "x" * 300}}) for i in range(30)]
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, hard))
        r1 = ex.export(batch(1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        r2 = ex.export(batch(2))
        ex.shutdown()
        print(json.dumps([r1.exported, r1.failed, r2.exported, r2.failed]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, 30, 30, 0]
    ids = [json.loads(line)["prediction_id"]
           for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert ids == [f"b2-{i}" for i in range(30)]  # no line of the failed batch, none torn


def test_jsonl_is_strict_json_and_rotates_by_bytes(tmp_path: Path) -> None:
    ex = JsonlExporter({"max_bytes": 1000, "backup_count": 2}, ExporterContext(tmp_path))
    rec = PredictionRecord(prediction_id="p", model_name="m", prediction_timestamp=1,
                           features={"x": math.nan, "y": math.inf, "z": -math.inf, "w": 1.5})
    assert ex.export([rec]).exported == 1

    def strict(c: str) -> Any:
        raise ValueError(c)

    line = (tmp_path / "records.jsonl").read_text().splitlines()[0]
    assert json.loads(line, parse_constant=strict)["features"] == {
        "x": "NaN", "y": "Infinity", "z": "-Infinity", "w": 1.5}
    ex.shutdown()
    d2 = tmp_path / "rot"
    ex = JsonlExporter({"max_bytes": 1000, "backup_count": 2}, ExporterContext(d2))
    for i in range(6):  # 120 three-byte characters per record: ~500 bytes, ~250 characters
        ex.export([PredictionRecord(prediction_id=f"p{i}", model_name="m",
                                    prediction_timestamp=1, features={"t": "€" * 120})])
    ex.shutdown()
    sizes = {p.name: p.stat().st_size for p in d2.iterdir()}
    assert set(sizes) == {"records.jsonl", "records.jsonl.1", "records.jsonl.2"}
    assert all(0 < s <= 1000 for s in sizes.values()), sizes
