"""The dashboard in a real browser (headless system Chromium through Selenium), against a real
`gateway run` with real replicas: what a person sees, including under a SIGKILL and with a
replica that prints HTML."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_support import (
    browser,  # noqa: F401 - a fixture
    get_json,
    infer,
    make_browser,
    needs_browser,
    predict,
    screenshot,
    shots,  # noqa: F401 - a fixture
    start_gateway,
    stop_gateway,
    wait_until,
)
from tests.ops_support import GatewayProcess

pytestmark = [needs_browser, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    gp, url = start_gateway(tmp_path_factory.mktemp("dash"))
    try:
        yield gp, url
    finally:
        stop_gateway(gp)


def by_css(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, css))


def text_of(driver: Any, css: str) -> str:
    els = by_css(driver, css)
    return str(els[0].text) if els else ""


def replica_ids(url: str, app: str) -> list[str]:
    serve = get_json(url + "/api/serve/applications/")
    return [r["replica_id"] for d in serve["applications"][app]["deployments"].values()
            for r in d["replicas"]]


def test_overview_lists_the_applications_with_replica_counts(
        gateway: tuple[GatewayProcess, str], browser: Any, shots: Path) -> None:  # noqa: F811
    gp, url = gateway
    infer(gp.address, 20)
    for i in range(20):
        predict(gp.address, f"warm-up {i}")
    browser.get(url + "/")

    def rows() -> dict[str, str] | None:
        out = {}
        for tr in by_css(browser, "#apps tbody tr"):
            cells = tr.text.split("\n")
            out[cells[0].split(" ")[0]] = tr.text
        return out if {"text", "classifier"} <= set(out) else None

    found = wait_until(rows, what="both applications in the overview")
    assert "RUNNING" in found["text"] and "RUNNING 1" in found["text"]
    assert "RUNNING 2" in found["classifier"]
    # Each application has its three charts, and the calls chart has moved.
    wait_until(lambda: float(by_css(browser, 'section[data-app="classifier"] '
                                             'svg[data-kind="calls"]')[0]
                             .get_attribute("data-max")) > 0, what="the calls chart to move")
    assert len(by_css(browser, 'section[data-app="text"] svg.chart')) == 3
    assert "gRPC" in text_of(browser, "main") and gp.address in text_of(browser, "main")
    screenshot(browser, shots, "overview")


def test_a_replica_page_shows_what_the_replica_printed(
        gateway: tuple[GatewayProcess, str], browser: Any, shots: Path) -> None:  # noqa: F811
    gp, url = gateway
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    predict(gp.address, marker)
    (rid,) = replica_ids(url, "text")
    browser.get(url + "/replicas/" + rid.replace("#", "%23"))
    wait_until(lambda: f"printed by the model: {marker}" in text_of(browser, "#log-lines"),
               what="the printed line in the replica's log view")
    meta = wait_until(lambda: text_of(browser, "#meta") or None, what="the replica metadata")
    assert "RUNNING" in meta and "Chatty" in meta
    assert "health check passed" in meta or "healthy" in meta
    screenshot(browser, shots, "replica")


def test_a_script_printed_by_a_replica_is_shown_as_text(
        gateway: tuple[GatewayProcess, str], browser: Any) -> None:  # noqa: F811
    gp, url = gateway
    evil = ("<script>window.__pwned=1;document.title='pwned'</script>"
            "<img src=x onerror=\"window.__pwned=2\"><b>bold</b>")
    predict(gp.address, evil)
    (rid,) = replica_ids(url, "text")
    browser.get(url + "/replicas/" + rid.replace("#", "%23"))
    wait_until(lambda: f"printed by the model: {evil}" in text_of(browser, "#log-lines"),
               what="the <script> line, as text")
    assert browser.execute_script("return window.__pwned") is None
    assert "pwned" not in browser.title
    assert not by_css(browser, "#log-lines script, #log-lines img, #log-lines b")


def test_a_chart_grows_after_calls(gateway: tuple[GatewayProcess, str],
                                   browser: Any) -> None:  # noqa: F811
    gp, url = gateway
    browser.get(url + "/apps/text")
    css = 'section[data-deployment="Chatty"] svg[data-kind="latency"]'
    before = int(wait_until(lambda: by_css(browser, css)[0].get_attribute("data-points"),
                            what="the latency chart"))
    for i in range(30):
        predict(gp.address, f"chart {i}")
    wait_until(lambda: int(by_css(browser, css)[0].get_attribute("data-points")) > before,
               timeout=20, what="new latency points after calls")
    calls = 'section[data-deployment="Chatty"] svg[data-kind="calls"]'
    assert float(by_css(browser, calls)[0].get_attribute("data-max")) > 0
    assert "max_ongoing_requests" in text_of(browser, "main")


def test_a_killed_replica_shows_dead_then_a_new_one_running(
        gateway: tuple[GatewayProcess, str], browser: Any, shots: Path) -> None:  # noqa: F811
    _gp, url = gateway
    serve = get_json(url + "/api/serve/applications/")
    victim = serve["applications"]["classifier"]["deployments"]["Iris"]["replicas"][0]
    old_pid, rid = victim["pid"], victim["replica_id"]
    os.kill(old_pid, signal.SIGKILL)
    browser.get(url + "/processes")

    def row(pid: int) -> str | None:
        for tr in by_css(browser, "#processes tbody tr"):
            cells = tr.text.split(" ")
            if str(pid) in cells:
                return str(tr.text)
        return None

    dead = wait_until(lambda: (r := row(old_pid)) and "DEAD" in r and r, timeout=20,
                      what="the killed replica listed as dead")
    assert "-9" in dead and rid in dead

    def new_pid() -> int | None:
        for p in get_json(url + "/api/gateway/processes")["processes"]:
            if p["name"] == rid and p["alive"] and p["pid"] != old_pid:
                return int(p["pid"])
        return None

    pid = wait_until(new_pid, timeout=30, what="a new process for the replica")
    wait_until(lambda: (r := row(pid)) and "ALIVE" in r, timeout=10,
               what="the new process listed alive")
    assert "DEAD" in (row(old_pid) or "")  # still listed, with its exit code
    wait_until(lambda: any(r["replica_id"] == rid and r["state"] == "RUNNING" and r["pid"] == pid
                           for d in get_json(url + "/api/serve/applications/")["applications"]
                           ["classifier"]["deployments"].values() for r in d["replicas"]),
               timeout=20, what="the replica running again")
    screenshot(browser, shots, "processes")


def test_a_log_page_stays_usable_with_1000_lines(
        gateway: tuple[GatewayProcess, str], browser: Any, shots: Path) -> None:  # noqa: F811
    gp, url = gateway
    # Each call writes four lines: an INFO, a WARNING, the print and the access line.
    for i in range(260):
        predict(gp.address, f"bulk {i}", rid=f"bulk-{i:04d}")
    (rid,) = replica_ids(url, "text")
    browser.get(url + "/replicas/" + rid.replace("#", "%23"))
    wait_until(lambda: browser.execute_script(
        "return document.querySelectorAll('#log-lines .ln').length") >= 1000,
        timeout=20, what="1,000 log lines shown")
    # Usable: the filters still answer (search by request id, then level).
    search = by_css(browser, "#log-search")[0]
    search.send_keys("bulk-0123")
    wait_until(lambda: 0 < browser.execute_script(
        "return document.querySelectorAll('#log-lines .ln').length") <= 4
        and "bulk 123" in text_of(browser, "#log-lines"), what="the search to filter")
    search.clear()
    search.send_keys(" ")  # an input event: back to every line
    from selenium.webdriver.support.ui import Select

    Select(by_css(browser, "#log-level")[0]).select_by_value("WARNING")
    wait_until(lambda: (lines := text_of(browser, "#log-lines").split("\n")) and len(lines) > 100
               and all(ln.startswith(("WARNING", "ERROR")) for ln in lines),
               what="only warnings and errors")
    screenshot(browser, shots, "replica-log-1000", full=False)


def test_gateway_log_and_records_pages(gateway: tuple[GatewayProcess, str],
                                       browser: Any, shots: Path) -> None:  # noqa: F811
    gp, url = gateway
    browser.get(url + "/logs/gateway")
    wait_until(lambda: "is healthy" in text_of(browser, "#log-lines"),
               what="controller lines in the gateway log view")
    infer(gp.address, 5)
    browser.get(url + "/records")
    row = wait_until(lambda: text_of(browser, "#exporters tbody tr"), what="the exporters table")
    assert row.startswith("jsonl")
    wait_until(lambda: "prediction_id" in text_of(browser, "main"),
               what="the last records sent")
    screenshot(browser, shots, "records")
    assert "not-for-pages" not in browser.page_source


def test_with_a_token_the_dashboard_asks_for_it(tmp_path: Path, shots: Path) -> None:  # noqa: F811
    token = "tok-" + uuid.uuid4().hex
    gp, url = start_gateway(tmp_path, token=token)
    driver = make_browser()
    try:
        driver.get(url + "/apps/text")
        wait_until(lambda: by_css(driver, "#token"), what="the login form")
        by_css(driver, "#token")[0].send_keys("wrong-token")
        by_css(driver, "#login")[0].click()
        wait_until(lambda: "not the admin token" in text_of(driver, "main"), what="a refusal")
        by_css(driver, "#token")[0].send_keys(token)
        by_css(driver, "#login")[0].click()
        wait_until(lambda: "Deployment Chatty" in text_of(driver, "main"),
                   what="the application page after logging in")
        assert token not in driver.page_source
        assert all(token not in c["value"] for c in driver.get_cookies())
    finally:
        driver.quit()
        stop_gateway(gp)
