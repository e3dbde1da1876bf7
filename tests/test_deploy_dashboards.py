"""The Grafana dashboards of deploy/grafana/: current with their Python source, well-formed
Grafana 10+ dashboards, and every panel's query answered by a real Prometheus scraping a real
gateway after known traffic (errors and prediction records included)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from gateway.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import PredictRequest, md, text_stub
from tests.fake_arize import FakeArize
from tests.test_metrics_prometheus import PROMETHEUS, _get, prometheus_server, query, traffic
from tests.test_records import COLUMNS, ROWS, infer_request

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None
)
needs_prometheus = pytest.mark.skipif(
    (PROMETHEUS is None or PROMTOOL is None) and os.environ.get("CI") != "true",
    reason="prometheus/promtool not installed (apt-get install prometheus)",
)

# Panels over metrics the gateway does not export yet, each with the issue that adds them.
# Every one must come back empty: when its metric appears, take the panel off this list.
NOT_YET_EXPORTED: set[tuple[str, str]] = set()
NOT_YET_EXPORTED_METRICS = re.compile(r"(?!)")  # matches nothing: every row is exported

# What Grafana puts in for its macros; `.*` is what "All" of every template variable means.
MACROS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
DS_REF = {"type": "prometheus", "uid": "${datasource}"}


def load_source() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def dashboards() -> dict[str, dict[str, Any]]:
    """uid -> the committed JSON."""
    out = {}
    for path in sorted(GRAFANA.glob("*.json")):
        d = json.loads(path.read_text())
        out[d["uid"]] = d
    return out


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in d["panels"] if p["type"] != "row"]


def substitute(expr: str, value: str = ".*") -> str:
    """`expr` as Grafana would send it with every template variable at `value`."""
    for macro, v in MACROS.items():
        expr = expr.replace(macro, v)
    expr = re.sub(r"\$\{?([A-Za-z]\w*)\}?", value, expr)
    assert "$" not in expr, expr
    return expr


def variables_used(text: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z]\w*)\}?", text))


# -- source of truth -------------------------------------------------------------------------


def test_committed_json_is_what_the_python_source_renders() -> None:
    mod = load_source()
    want = mod.rendered()
    have = {p.name: p.read_text() for p in GRAFANA.glob("*.json")}
    assert set(have) == set(want), "stray or missing dashboard files"
    stale = [name for name in want if have[name] != want[name]]
    assert not stale, f"{stale} are stale: run .venv/bin/python deploy/grafana/dashboards.py"
    assert subprocess.run([sys.executable, str(GRAFANA / "dashboards.py"), "--check"],
                          timeout=60).returncode == 0


# -- Grafana's model -------------------------------------------------------------------------


def test_dashboards_are_well_formed_grafana_10_models() -> None:
    ds = dashboards()
    assert set(ds) == {"grpc-gateway-overview", "grpc-gateway-deployment",
                       "grpc-gateway-records", "grpc-gateway-process"}
    assert len({d["title"] for d in ds.values()}) == len(ds)
    for uid, d in ds.items():
        for key in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version",
                    "editable", "tags", "annotations", "refresh", "timepicker", "__requires"):
            assert key in d, (uid, key)
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid)
        assert d["id"] is None  # importable anywhere
        assert d["schemaVersion"] >= 38  # Grafana 10.0's; an older Grafana would migrate down
        grafana = [r for r in d["__requires"] if r["type"] == "grafana"]
        assert grafana and int(grafana[0]["version"].split(".")[0]) >= 10
        required_panels = {r["id"] for r in d["__requires"] if r["type"] == "panel"}

        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), uid
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"])}
            assert not mine & cells, f"{uid}: panel {p['title']!r} overlaps another"
            cells |= mine
        titles = [p["title"] for p in panels(d)]
        assert len(titles) == len(set(titles)), uid
        for p in panels(d):
            assert p["type"] in required_panels, p["type"]
            assert p["datasource"] == DS_REF, (uid, p["title"])
            assert p["targets"], (uid, p["title"])
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
            for t in p["targets"]:
                assert t["datasource"] == DS_REF, (uid, p["title"], t["refId"])
                assert t["expr"].strip() and "legendFormat" in t

        # Variables: the datasource first; every query variable reads through it; every
        # variable a query uses is declared, and every declared one is used.
        tvars = d["templating"]["list"]
        assert tvars[0]["name"] == "datasource" and tvars[0]["type"] == "datasource"
        assert tvars[0]["query"] == "prometheus"
        declared = {v["name"] for v in tvars[1:]}
        for v in tvars[1:]:
            assert v["type"] == "query" and v["datasource"] == DS_REF, v
            assert v["query"]["query"].startswith("label_values(") and v["allValue"] == ".*"
        used = set().union(*(variables_used(t["expr"]) for p in panels(d)
                             for t in p["targets"]))
        used -= {"__rate_interval", "__interval", "__range"}
        assert used == declared, (uid, used, declared)


@needs_prometheus
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule) with Grafana's substitutions."""
    assert PROMTOOL is not None, "promtool missing (CI installs the Debian package)"
    rules = []
    for uid, d in dashboards().items():
        for p in panels(d):
            for t in p["targets"]:
                rules.append({"record": f"panel:{len(rules)}", "expr": substitute(t["expr"])})
        for v in d["templating"]["list"][1:]:
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["query"]["query"])
            assert inner, (uid, v["name"])
            rules.append({"record": f"variable:{len(rules)}", "expr": substitute(inner[1])})
    path = tmp_path / "panels.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- queries against known series (promtool) -------------------------------------------------


def panel_expr(uid: str, title: str, ref: str = "A") -> str:
    (p,) = [p for p in panels(dashboards()[uid]) if p["title"] == title]
    (t,) = [t for t in p["targets"] if t["refId"] == ref]
    return substitute(t["expr"])


def promtool_expect(tmp_path: Path, interval: str, series: dict[str, str],
                    checks: list[tuple[str, str, list[tuple[str, float]]]]) -> None:
    """`promtool test rules` of `checks` (query, eval time, [(labels, value)]) over `series`
    (series -> promtool values notation): what a panel shows for known data."""
    assert PROMTOOL is not None, "promtool missing (CI installs the Debian package)"
    spec = {"rule_files": [], "evaluation_interval": interval, "tests": [{
        "interval": interval,
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "promql_expr_test": [
            {"expr": expr, "eval_time": at,
             "exp_samples": [{"labels": labels, "value": value} for labels, value in want]}
            for expr, at, want in checks],
    }]}
    path = tmp_path / "panels_test.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_prometheus
def test_drop_panels_count_a_reason_whose_series_appears_already_non_zero(
    tmp_path: Path
) -> None:
    """The gateway may create a `{exporter, reason}` series at its first drop: the drops in
    its first sample count (increase() alone shows 0 for them)."""
    records = "grpc-gateway-records"
    m = 'grpc_gateway_records_dropped_total{instance="gw:8080",job="grpc-gateway",'
    promtool_expect(tmp_path, "15s", {
        m + 'exporter="",reason="payload_too_large"}': "_x20 1x60",
        m + 'exporter="arize",reason="queue_full"}': "_x20 500x60",
        m + 'exporter="jsonl",reason="queue_full"}': "0x20 500 510 520x58",
        m + 'exporter="jsonl",reason="shutdown"}': "0x80",
    }, [
        (panel_expr(records, "Records dropped in 10 minutes by exporter and reason"), "7m",
         [('{exporter="arize",reason="queue_full"}', 500),
          ('{exporter="jsonl",reason="queue_full"}', 520),
          ('{exporter="jsonl",reason="shutdown"}', 0)]),
        (panel_expr(records, "Sampled calls dropped in 10 minutes before any exporter, "
                             "by reason"), "7m", [('{reason="payload_too_large"}', 1)]),
        # Ten minutes on, nothing new: back to 0.
        (panel_expr(records, "Sampled calls dropped in 10 minutes before any exporter, "
                             "by reason"), "17m", [('{reason="payload_too_large"}', 0)]),
    ])


@needs_prometheus
def test_restarts_panel_counts_whole_restarts_between_unaligned_scrapes(tmp_path: Path) -> None:
    """3 restarts are 3 (increase() says 3.08 with 15 s scrapes and an unaligned window); a
    replica first seen in the window counts from its first start."""
    m = ('ray_serve_deployment_replica_starts_total{instance="gw:8080",job="grpc-gateway",'
         'application="a",deployment="d",replica=')
    promtool_expect(tmp_path, "15s", {
        m + '"a#d#three"}': "1x43 2 3 4x60",
        m + '"a#d#born"}': "_x56 5x30",
        m + '"a#d#fresh"}': "_x56 1x30",
    }, [(panel_expr("grpc-gateway-deployment", "Restarts in 10 minutes"), "20m5s", [
        (f'{{instance="gw:8080",application="a",deployment="d",replica="a#d#{r}"}}', n)
        for r, n in (("three", 3), ("born", 4), ("fresh", 0))])])


@needs_prometheus
def test_error_ratio_panel_reads_the_gateway_and_ray_code_labels(tmp_path: Path) -> None:
    """The gateway labels a code `UNAVAILABLE`, Ray Serve's proxy `StatusCode.UNAVAILABLE`."""
    promtool_expect(tmp_path, "15s", {  # the panel's rate window: 30s
        'ray_serve_num_grpc_requests_total{application="gw",status_code="OK"}': "0+300x20",
        'ray_serve_num_grpc_requests_total{application="gw",status_code="UNAVAILABLE"}':
            "0+100x20",
        'ray_serve_num_grpc_error_requests_total{application="gw",error_code="UNAVAILABLE"}':
            "0+100x20",
        'ray_serve_num_grpc_requests_total{application="ray",status_code="StatusCode.OK"}':
            "0+300x20",
        'ray_serve_num_grpc_requests_total{application="ray",status_code="StatusCode.INTERNAL"}':
            "0+100x20",
        'ray_serve_num_grpc_error_requests_total{application="ray",'
        'error_code="StatusCode.INTERNAL"}': "0+100x20",
        'ray_serve_num_grpc_error_requests_total{application="ray",'
        'error_code="StatusCode.CANCELLED"}': "0+100x20",
    }, [(panel_expr("grpc-gateway-overview", "gRPC error ratio (server-side codes)"), "4m",
         [('{application="gw"}', 0.25), ('{application="ray"}', 0.25)])])


@needs_prometheus
def test_memory_per_replica_keeps_gateways_apart(tmp_path: Path) -> None:
    """Two gateways (containers) each run a replica of a/d as pid 7: two 200 MB lines, not one
    of 400 MB."""
    series = {}
    for gw in ("gw-1:8080", "gw-2:8080"):
        labels = (f'instance="{gw}",job="grpc-gateway",Component="ray::ServeReplica:a:d",'
                  'ip="0.0.0.0",pid="7"')
        series[f"ray_component_rss_mb{{{labels}}}"] = "200x10"
        series[f"ray_component_mem_shared_bytes{{{labels}}}"] = "50000000x10"
    want = [(f'{{instance="{gw}",Component="ray::ServeReplica:a:d",pid="7"}}', 2e8)
            for gw in ("gw-1:8080", "gw-2:8080")]
    title = "Memory per replica"
    promtool_expect(tmp_path, "1m", series, [
        (panel_expr("grpc-gateway-deployment", title, "A"), "5m", want),
        (panel_expr("grpc-gateway-deployment", title, "B"), "5m",
         [(labels, 1.5e8) for labels, _ in want]),
    ])


@needs_prometheus
def test_cpu_panel_reads_rays_cpu_metric_of_the_gateway_process(tmp_path: Path) -> None:
    """"CPU" reads `ray_component_cpu_percentage{Component, ip, pid}` (Ray's name, the labels of
    `ray_component_rss_mb`; 100 = one core) of the gateway process, one line per gateway: the
    metric the gateway exports for itself and each local replica."""
    m = 'ray_component_cpu_percentage{job="grpc-gateway",ip="0.0.0.0",'
    promtool_expect(tmp_path, "1m", {
        m + 'instance="gw-1:8080",Component="ray::ProxyActor",pid="1"}': "150x10",
        m + 'instance="gw-2:8080",Component="ray::ProxyActor",pid="1"}': "20x10",
        m + 'instance="gw-1:8080",Component="ray::ServeReplica:a:d",pid="7"}': "90x10",
    }, [(panel_expr("grpc-gateway-process", "CPU"), "5m",
         [('{instance="gw-1:8080",pid="1"}', 150), ('{instance="gw-2:8080",pid="1"}', 20)])])
    readme = (ROOT / "README.md").read_text()
    assert "`ray_component_cpu_percentage{Component,ip,pid}`" in readme


# -- against a real gateway ------------------------------------------------------------------


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


async def evaluate(base: str, value: str = ".*") -> dict[tuple[str, str, str], list[Any]]:
    """(dashboard uid, panel title, refId) -> the instant query's result."""
    out = {}
    for uid, d in dashboards().items():
        for p in panels(d):
            for t in p["targets"]:
                out[uid, p["title"], t["refId"]] = await query(base, substitute(t["expr"], value))
    return out


async def known_traffic(address: str) -> None:
    """OK calls, replica failures (INTERNAL), caller errors (INVALID_ARGUMENT, NOT_FOUND), a
    call too large to record, and batched Open Inference Protocol calls."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = text_stub(ch)
        for _ in range(10):
            await stub.Predict(PredictRequest(text="good"), metadata=md(), timeout=10)
        for code, n in ((grpc.StatusCode.INTERNAL, 3), (grpc.StatusCode.INVALID_ARGUMENT, 2)):
            for _ in range(n):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Predict(PredictRequest(text="x", fail_code=code.value[0]),
                                       metadata=md(), timeout=10)
                assert e.value.code() is code
        await stub.Predict(PredictRequest(text="good " * 1000), metadata=md(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Predict(PredictRequest(text="x"), metadata=md("nope"), timeout=10)
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        iris = pb_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(4):
            await iris.ModelInfer(infer_request(ROWS), metadata=md("classifier"), timeout=10)


@contextlib.asynccontextmanager
async def http_traffic(gw: Any) -> AsyncIterator[None]:
    """REST calls flowing in the background (bounded: at most one every 50 ms), one in five
    failing with 500, so the HTTP rates, ratios and quantiles have data."""
    stop = asyncio.Event()
    assert gw.http is not None
    url = f"http://127.0.0.1:{gw.http.port}/demo.text.TextModel/Predict"

    async def run() -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for i in range(2000):
                if stop.is_set():
                    return
                body = {"text": "good", "failCode": 13 if i % 5 == 4 else 0}
                async with session.post(url, json=body, headers={"application": "text"}) as r:
                    await r.read()
                await asyncio.sleep(0.05)

    task = asyncio.ensure_future(run())
    try:
        yield
    finally:
        stop.set()
        await task


def gateway_setup(fake: FakeArize) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    text = {"name": "text", "deployments": [
        {"name": "TextModel", "import_path": "examples.models:TextModel"}],
        "prediction_records": {
            "enabled": True, "exporters": ["arize"], "max_payload_bytes": 1000,
            "field_mapping": {"features": ["text"], "prediction_label": "label",
                              "prediction_score": "score"}}}
    iris = {"name": "classifier", "deployments": [
        {"name": "Iris", "import_path": "examples.models:Iris"}],
        "prediction_records": {
            "enabled": True, "exporters": ["arize", "small"], "model_name": "iris",
            "field_mapping": {"column_names": {"features": COLUMNS}}}}
    records = {
        "arize": {"api_key": "test-key", "space_id": "test-space", "api_scheme": "http",
                  "api_host": fake.host, "api_port": fake.port, "timeout_s": 2,
                  "max_retries": 1, "backoff_initial_s": 0.05, "backoff_max_s": 0.1},
        # A queue of one: a 3-row call drops records (queue_full) on this exporter.
        "exporters": [{"name": "small", "type": "jsonl", "queue_size": 1}],
        "flush_interval_s": 0.05,
    }
    # Multiplexed models: 2 slots, calls cycling over 3 ids (every call loads and unloads).
    mux = {"name": "mx", "deployments": [
        {"name": "MuxText", "import_path": "tests.multiplex_models:MuxText"}]}
    return [text, iris, mux], records


@contextlib.asynccontextmanager
async def mux_traffic(ch: grpc.aio.Channel) -> AsyncIterator[None]:
    """Multiplexed calls in the background (bounded), so model loads keep happening."""
    stop = asyncio.Event()

    async def run() -> None:
        stub = text_stub(ch)
        for n in range(2000):
            if stop.is_set():
                return
            await stub.Predict(PredictRequest(text="x"), timeout=10, metadata=(
                ("application", "mx"), ("multiplexed_model_id", f"m{n % 3}")))
            await asyncio.sleep(0.1)

    task = asyncio.ensure_future(run())
    try:
        yield
    finally:
        stop.set()
        await task


def labels_of(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


@needs_prometheus
async def test_every_panel_returns_data_from_a_real_gateway(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MUX_TEST_SLOTS", "2")
    ds = dashboards()
    exprs = {(uid, p["title"]): " ".join(t["expr"] for t in p["targets"])
             for uid, d in ds.items() for p in panels(d)}
    # The lists name exactly the panels over metrics not exported yet.
    assert {k for k, e in exprs.items() if NOT_YET_EXPORTED_METRICS.search(e)} == NOT_YET_EXPORTED
    empty = NOT_YET_EXPORTED
    legends = {(uid, p["title"], t["refId"]): t["legendFormat"]
               for uid, d in ds.items() for p in panels(d) for t in p["targets"]}

    with FakeArize() as fake:
        fake.status = 500  # Arize down: retries, then failed records; up again below
        apps, records = gateway_setup(fake)
        async with start_gateway(apps, records=records, http={"enabled": True, "port": 0}) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            assert gw.metrics_port
            with prometheus_server(tmp_path, gw.metrics_port) as base:
                await known_traffic(gw.address)
                loop = asyncio.get_running_loop()
                end = loop.time() + 20
                while gw.records.stats["arize"].failed == 0 and loop.time() < end:
                    await asyncio.sleep(0.05)
                fake.status = 200
                async with traffic(ch), http_traffic(gw), mux_traffic(ch):
                    end = loop.time() + 60
                    while True:
                        results = await evaluate(base)
                        missing = [k for k, r in results.items()
                                   if k[:2] not in empty and not has_data(r)]
                        if not missing or loop.time() > end:
                            break
                        await asyncio.sleep(1)
                    strict = await evaluate(base, ".+")
                    variable_values = {
                        (uid, v["name"]): await label_values(base, v["query"]["query"])
                        for uid, d in ds.items() for v in d["templating"]["list"][1:]}
                    alert_checks = await check_alert_queries(base)
            snap = gw.records.snapshot()["exporters"]["arize"]

    assert not missing, "panels without data:\n" + "\n".join(
        f"  {k}: {substitute(t['expr'])}" for k in missing
        for t in next(p for p in panels(ds[k[0]]) if p["title"] == k[1])["targets"]
        if t["refId"] == k[2])
    # Expected-empty panels really are empty (else: take them off the list).
    filled = sorted({k[:2] for k, r in results.items() if k[:2] in empty and r})
    assert not filled, f"these panels have data now: remove them from the lists: {filled}"
    # With every variable at `.+` (the label must exist) the same panels fill: the variables
    # filter on labels these metrics have.
    unfiltered = [k for k, r in strict.items() if k[:2] not in empty and not has_data(r)]
    assert not unfiltered, f"empty with variables at .+ (a filtered label is missing): {unfiltered}"
    # Every label a legend names is on the series.
    for k, r in results.items():
        if k[:2] in empty:
            continue
        have = set().union(*(set(s["metric"]) for s in r))
        assert labels_of(legends[k]) <= have, (k, legends[k], have)
    assert all(variable_values.values()), variable_values
    assert not alert_checks, alert_checks

    # The known traffic shows where it should.
    def series(uid: str, title: str, ref: str = "A") -> dict[tuple[str, ...], float]:
        return {tuple(sorted(s["metric"].values())): float(s["value"][1])
                for s in results[uid, title, ref]}

    codes = {s["metric"].get("error_code") for s in
             results["grpc-gateway-overview", "gRPC errors/s by code", "A"]}
    assert {"INTERNAL", "INVALID_ARGUMENT", "NOT_FOUND"} <= codes
    healthy = series("grpc-gateway-overview", "Healthy replicas per deployment")
    assert healthy == {("Iris", "classifier"): 1.0, ("TextModel", "text"): 1.0,
                       ("MuxText", "mx"): 1.0}
    dropped = {(s["metric"].get("exporter"), s["metric"]["reason"]) for s in results[
        "grpc-gateway-records", "Records dropped in 10 minutes by exporter and reason", "A"]}
    assert ("small", "queue_full") in dropped
    before = {s["metric"]["reason"] for s in results[
        "grpc-gateway-records",
        "Sampled calls dropped in 10 minutes before any exporter, by reason", "A"]}
    assert "payload_too_large" in before
    assert snap["failed"] >= 1 and snap["retries"] >= 1 and snap["exported"] >= 1, snap


async def label_values(base: str, variable_query: str) -> list[str]:
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query)
    assert m, variable_query
    url = (f"{base}/api/v1/label/{m[2]}/values?"
           + urllib.parse.urlencode({"match[]": substitute(m[1])}))
    status, body = await asyncio.to_thread(_get, url)
    assert status == 200, body
    values: list[str] = json.loads(body)["data"]
    return values


async def check_alert_queries(base: str) -> list[str]:
    """Problems of alerts.yaml against the real gateway: a query Prometheus refuses, or a
    metric it names that the gateway does not export (HTTP ones excepted, see above)."""
    problems = []
    exported = {r["metric"]["__name__"] for r in await query(
        base, 'count by (__name__) ({__name__=~"ray_.+|grpc_.+"})')}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            status, body = await asyncio.to_thread(_get, url)
            if status != 200:
                problems.append(f"{rule['alert']}: {body}")
            for name in re.findall(r"\b(?:ray|grpc)_\w+", expr):
                if name not in exported and not NOT_YET_EXPORTED_METRICS.fullmatch(name):
                    problems.append(f"{rule['alert']}: {name} is not exported")
    return problems
