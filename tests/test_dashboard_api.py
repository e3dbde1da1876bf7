"""The dashboard's JSON API against a running gateway: Ray's ServeInstanceDetails field by
field, the gateway's own views, access with and without a token, secrets kept out, and the
controller loop's metrics under Ray's names."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import psutil
import pytest

from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.logs.core import replica_log_file
from tests.conftest import TEXT_APP, PredictRequest, md, text_stub

ARIZE_KEY = "arize-key-never-served-1234"
TOKEN = "dash-token-5678-abcd"
APPS = [
    {**TEXT_APP, "deployments": [{**TEXT_APP["deployments"][0], "num_replicas": 2,
                                  "max_ongoing_requests": 7, "max_queued_requests": 11,
                                  "user_config": {"threshold": 0.25, "api_key": "uc-secret"}}]},
    {"name": "classifier", "ingress": "Iris",
     "deployments": [{"name": "Iris", "import_path": "examples.models:Iris"}]},
]


def dash(**extra: Any) -> dict[str, Any]:
    return {"dashboard": {"enabled": True, "port": 0, **extra},
            "records": {"arize": {"api_key": ARIZE_KEY}}}


async def fetch(gw: Gateway, path: str, **kw: Any) -> tuple[int, Any, str]:
    assert gw.dashboard is not None
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{gw.dashboard.port}{path}", allow_redirects=False,
                  **kw) as r:
        text = await r.text()
        data = await r.json() if r.content_type == "application/json" else None
        return r.status, data, text


@pytest.fixture
async def gw(start_gateway: Any) -> AsyncIterator[Gateway]:
    async with start_gateway(APPS, **dash()) as g:
        yield g


async def test_applications_answer_in_rays_shape_field_by_field(gw: Gateway) -> None:
    status, data, text = await fetch(gw, "/api/serve/applications/")
    assert status == 200
    assert set(data) >= {"controller_info", "proxy_location", "http_options", "grpc_options",
                         "proxies", "deploy_mode", "target_capacity", "applications"}
    assert data["deploy_mode"] == "MULTI_APP"
    assert data["grpc_options"]["port"] == gw.port
    assert data["controller_info"]["pid"] == os.getpid()
    (proxy,) = data["proxies"].values()
    assert proxy["status"] == "HEALTHY" and proxy["address"] == gw.address
    assert proxy["pid"] == os.getpid()
    assert set(data["applications"]) == {"text", "classifier"}
    for name, app_state in gw.controller.apps.items():
        app = data["applications"][name]
        assert app["name"] == name
        assert app["route_prefix"] is None  # gRPC routes by the `application` key
        assert app["status"] == app_state.status == "RUNNING"
        assert app["message"] == ""
        assert app["last_deployed_time_s"] == pytest.approx(app_state.deployed_at)
        assert app["deployed_app_config"]["name"] == name
        assert app["ingress_deployment"] == app_state.ingress.name
        assert set(app["deployments"]) == set(app_state.deployments)
        for dname, dep in app_state.deployments.items():
            d = app["deployments"][dname]
            assert d["name"] == dname and d["status"] == "HEALTHY" and d["message"] == ""
            cfg = d["deployment_config"]
            for key in ("num_replicas", "max_ongoing_requests", "max_queued_requests",
                        "health_check_period_s", "graceful_shutdown_timeout_s"):
                assert cfg[key] == getattr(dep.config, key)
            assert d["target_num_replicas"] == dep.config.num_replicas
            assert [r["replica_id"] for r in d["replicas"]] == [s.replica_id for s in dep.slots]
            for r, slot in zip(d["replicas"], dep.slots, strict=True):
                assert r["state"] == "RUNNING"
                assert r["pid"] == slot.pid and psutil.pid_exists(r["pid"])
                assert r["actor_name"] == f"SERVE_REPLICA::{slot.replica_id}"
                assert r["node_ip"] == "127.0.0.1"
                assert gw.started_at <= r["start_time_s"] <= time.time()
                assert r["log_file_path"] == str(replica_log_file(gw.logs_dir or "",
                                                                  slot.replica_id))
                assert r["log_file_path"].endswith(".log")
                assert r["address"] == slot.replica.address  # type: ignore[union-attr]
                assert r["restarts"] == 0 and r["in_flight"] == 0
    text_dep = data["applications"]["text"]["deployments"]["TextModel"]
    assert text_dep["deployment_config"]["max_ongoing_requests"] == 7
    assert text_dep["deployment_config"]["max_queued_requests"] == 11
    assert text_dep["replica_states"] == {"RUNNING": 2}
    # user_config is shown, with what looks like a secret redacted; the Arize key never.
    assert text_dep["deployment_config"]["user_config"] == {"threshold": 0.25,
                                                            "api_key": "**********"}
    assert "uc-secret" not in text and ARIZE_KEY not in text
    # Ray's path without the trailing slash answers the same.
    status, again, _ = await fetch(gw, "/api/serve/applications")
    assert status == 200 and set(again["applications"]) == {"text", "classifier"}


async def test_memory_and_in_flight_show_per_replica(gw: Gateway) -> None:
    for _ in range(50):  # memory is sampled every few seconds: wait for the first sample
        _, data, _ = await fetch(gw, "/api/gateway/processes")
        if all(p["rss_bytes"] for p in data["processes"]):
            break
        await asyncio.sleep(0.1)
    procs = {p["pid"]: p for p in data["processes"]}
    assert procs[os.getpid()]["kind"] == "gateway"
    for _dep, slot in gw.controller.slots():
        p = procs[slot.pid]
        assert p["alive"] and p["name"] == slot.replica_id and p["kind"] == "replica"
        assert 0 < p["rss_minus_shared_bytes"] < p["rss_bytes"]


async def test_timeseries_count_calls_errors_and_latency(gw: Gateway) -> None:
    async with grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for _ in range(20):
            await stub.Predict(PredictRequest(text="x"), metadata=md("text"))
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Predict(PredictRequest(text="x", fail_code=3),
                                   metadata=md("text"))
    assert gw.dashboard is not None
    gw.dashboard.series.sample([])  # close the interval now rather than in 2 s
    _, ts, _ = await fetch(gw, "/api/gateway/timeseries?application=text")
    assert ts["step_s"] == 2.0 and ts["window_s"] == 900.0
    last = ts["points"][-1]
    assert last["calls_per_s"] > 0
    assert set(last["errors_per_s"]) == {"INVALID_ARGUMENT"}
    assert 0 < last["p50_ms"] <= last["p90_ms"] <= last["p99_ms"]
    _, dep, _ = await fetch(gw, "/api/gateway/timeseries?application=text&deployment=TextModel")
    assert dep["points"][-1]["calls_per_s"] == pytest.approx(last["calls_per_s"])
    status, err, _ = await fetch(gw, "/api/gateway/timeseries")
    assert status == 400 and "application" in err["error"]


async def test_replica_view_events_and_log(gw: Gateway) -> None:
    async with grpc.aio.insecure_channel(gw.address) as ch:
        await text_stub(ch).Predict(PredictRequest(text="x"),
                                    metadata=md("text", x_request_id="rid-42"))
    slot = gw.controller.apps["text"].deployments["TextModel"].slots[0]
    rid = slot.replica_id.replace("#", "%23")
    status, r, _ = await fetch(gw, f"/api/gateway/replicas/{rid}")
    assert status == 200 and r["replica_id"] == slot.replica_id and r["pid"] == slot.pid
    assert [e["event"] for e in r["events"]][:2] == ["started", "healthy"]
    assert (await fetch(gw, "/api/gateway/replicas/nope"))[0] == 404
    # The gateway's own log, filtered by level, and the bad parameters answered 400.
    _, logs, _ = await fetch(gw, "/api/gateway/logs?component=gateway&level=INFO")
    assert any("is healthy" in e["message"] for e in logs["entries"])
    assert (await fetch(gw, "/api/gateway/logs?component=gateway&level=LOUD"))[0] == 400
    assert (await fetch(gw, "/api/gateway/logs?component=gateway&after=x"))[0] == 400
    assert (await fetch(gw, "/api/gateway/logs"))[0] == 400
    assert (await fetch(gw, "/api/gateway/logs?replica=nope"))[0] == 404


async def test_pages_and_static_files(gw: Gateway) -> None:
    for path in ("/", "/apps/text", "/processes", "/records", "/logs/gateway",
                 "/replicas/" + gw.controller.slots()[0][1].replica_id.replace("#", "%23")):
        status, _, html = await fetch(gw, path)
        assert status == 200, path
        assert "/static/dashboard.js" in html
    status, _, html = await fetch(gw, "/apps/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert status == 404 and "<script>alert" not in html and "&lt;script&gt;" in html
    assert (await fetch(gw, "/static/dashboard.js"))[0] == 200
    assert (await fetch(gw, "/static/..%2Fserver.py"))[0] == 404
    assert (await fetch(gw, "/static/nope.js"))[0] == 404
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{gw.dashboard.port}/") as r:  # type: ignore[union-attr]
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_only_loopback_host_names_without_a_token(gw: Gateway) -> None:
    status, err, _ = await fetch(gw, "/api/gateway/overview", headers={"Host": "evil.example"})
    assert status == 403 and "loopback" in err["error"]
    assert (await fetch(gw, "/api/gateway/overview",
                        headers={"Host": f"localhost:{gw.dashboard.port}"}))[0] == 200  # type: ignore[union-attr]


async def test_with_a_token_every_page_and_answer_needs_it(start_gateway: Any) -> None:
    async with start_gateway(APPS[:1], admin={"port": 0, "token": TOKEN}, **dash()) as g:
        assert (await fetch(g, "/api/serve/applications/"))[0] == 401
        status, err, _ = await fetch(g, "/api/gateway/overview",
                                     headers={"Authorization": "Bearer wrong"})
        assert status == 401 and TOKEN not in err["error"]
        status, _, _ = await fetch(g, "/")
        assert status == 302
        ok = {"Authorization": f"Bearer {TOKEN}"}
        status, data, text = await fetch(g, "/api/serve/applications/", headers=ok)
        assert status == 200 and "text" in data["applications"] and TOKEN not in text
        # The login form sets a cookie (not the token) that opens the pages.
        assert g.dashboard is not None
        base = f"http://127.0.0.1:{g.dashboard.port}"
        # (unsafe=True: aiohttp's jar otherwise drops cookies of IP-address hosts; browsers don't)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.post(base + "/login", data={"token": "nope", "next": "/"},
                              allow_redirects=False) as r:
                assert r.status == 401
            async with s.post(base + "/login", data={"token": TOKEN, "next": "//evil.example/"},
                              allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/"
                cookie = r.cookies["gateway_dashboard"]
                assert TOKEN not in cookie.value and cookie["httponly"]
            async with s.get(base + "/api/gateway/processes") as r:
                assert r.status == 200
            for path in ("/", "/apps/text", "/api/gateway/records", "/api/gateway/overview"):
                async with s.get(base + path) as r:
                    body = await r.text()
                    assert r.status == 200 and TOKEN not in body and ARIZE_KEY not in body


def test_the_config_refuses_an_exposed_dashboard_without_a_token() -> None:
    with pytest.raises(ConfigError, match=r"needs admin\.token"):
        parse_config({"dashboard": {"enabled": True, "host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="also"):
        parse_config({"dashboard": {"enabled": True, "port": 9001}})
    with pytest.raises(ConfigError, match="http"):
        parse_config({"dashboard": {"prometheus_url": "javascript:alert(1)"}})
    cfg = parse_config({"dashboard": {"enabled": True, "host": "0.0.0.0"},
                        "admin": {"token": "t0ken"}})
    assert cfg.dashboard.port == 8265


async def test_disabled_by_default_and_no_observer(start_gateway: Any) -> None:
    async with start_gateway(APPS[:1]) as g:
        assert g.dashboard is None
        assert len(g.proxy.observers) == len([o for o in g.proxy.observers
                                              if "CallSeries" not in repr(o)])


async def test_controller_loop_metrics_under_rays_names(gw: Gateway) -> None:
    def scrape() -> str:
        url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def loops(text: str) -> float:
        for line in text.splitlines():
            if line.startswith("ray_serve_controller_num_control_loops{"):
                assert f'actor_id="{gw.control_loop.actor_id}"' in line
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no ray_serve_controller_num_control_loops")

    first = await asyncio.to_thread(scrape)
    assert any(line.startswith("ray_serve_controller_control_loop_duration_s")
               and float(line.rsplit(" ", 1)[1]) >= 0 for line in first.splitlines())
    await asyncio.sleep(0.5)
    assert loops(await asyncio.to_thread(scrape)) > loops(first)


async def test_odd_names_and_malformed_requests(start_gateway: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from urllib.parse import quote

    odd = [{"name": "a/b<x>", "deployments": [{"name": "D<i>",
                                               "import_path": "examples.models:TextModel"}]}]
    async with start_gateway(odd, **dash()) as g:
        slot = g.controller.slots()[0][1]
        app, dep, rid = (quote(x, safe="") for x in ("a/b<x>", "D<i>", slot.replica_id))
        status, _, html = await fetch(g, f"/apps/{app}")
        assert status == 200 and "a/b&lt;x&gt;" in html and "<x>" not in html
        assert (await fetch(g, f"/replicas/{rid}"))[0] == 200
        status, data, _ = await fetch(g, f"/api/gateway/deployments/{app}/{dep}")
        assert status == 200 and data["name"] == "D<i>"
        assert (await fetch(g, f"/api/gateway/replicas/{rid}"))[1]["replica_id"] == \
            slot.replica_id
        # An overlong URL is refused (400) without a traceback in the gateway's log.
        caplog.clear()
        assert (await fetch(g, "/api/gateway/logs?component=gateway&q=" + "x" * 20000))[0] \
            == 400
        assert not [r for r in caplog.records if r.levelno >= 40]
        # Out-of-range numbers are clamped, not errors.
        for q in ("limit=-5", "limit=99999999999", "after=-1", "after=99999999999"):
            assert (await fetch(g, f"/api/gateway/logs?component=gateway&{q}"))[0] == 200
        assert (await fetch(g, "/api/gateway/timeseries?application=nope"))[1]["points"] == []
