"""Support for the dashboard tests: a real `gateway run` with the dashboard on, a headless
system Chromium driven by Selenium, bounded waits, and screenshots kept as test artifacts."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.pb import grpc_predict_v2_pb2_grpc as oip_grpc
from gateway.pb import text_model_pb2, text_model_pb2_grpc
from tests.ops_support import GatewayProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
# Under CI .ci/run installs them: a missing browser must fail there, never skip.
needs_browser = pytest.mark.skipif(
    not HAVE_BROWSER and os.environ.get("CI") != "true",
    reason="chromium and chromium-driver are not installed (apt-get install chromium "
           "chromium-driver)",
)

T = TypeVar("T")

CONFIG = """
proxy: {host: 127.0.0.1, port: 0, graceful_shutdown_timeout_s: 2}
admin: {port: 0TOKEN}
metrics: {prometheus: {port: 0}}
dashboard: {enabled: true, port: 0}
logging_config: {logs_dir: LOGS}
records: {jsonl_path: LOGS/records.jsonl, flush_interval_s: 0.2}
applications:
  - name: text
    deployments:
      - {name: Chatty, import_path: "tests.ops_support:Chatty", num_replicas: 1}
  - name: classifier
    deployments:
      - name: Iris
        import_path: examples.models:Iris
        num_replicas: 2
        user_config: {threshold: 0.5, api_key: not-for-pages}
    prediction_records: {enabled: true, model_name: iris}
"""


def start_gateway(tmp: Path, token: str | None = None) -> tuple[GatewayProcess, str]:
    """A real `gateway run` with both test applications; returns it and the dashboard URL."""
    cfg = tmp / "serve.yaml"
    text = CONFIG.replace("LOGS", str(tmp / "logs"))
    text = text.replace("TOKEN", f", token: {json.dumps(token)}" if token else "")
    cfg.write_text(text)
    gp = GatewayProcess(cfg)
    try:
        url = gp.wait_for(r"dashboard on (\S+)", 10)
        gp.wait_for(r"application 'classifier': (RUNNING)", 30)
    except BaseException:
        stop_gateway(gp)  # never leave a gateway behind a failed start
        raise
    return gp, url


def stop_gateway(gp: GatewayProcess) -> None:
    if gp.proc.poll() is None:
        gp.proc.terminate()
        try:
            gp.wait(20)
        except Exception:
            gp.kill()


def get_json(url: str, token: str | None = None) -> Any:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def predict(address: str, text: str, rid: str = "") -> None:
    md = [("application", "text")] + ([("x-request-id", rid)] if rid else [])
    with grpc.insecure_channel(address) as ch:
        text_model_pb2_grpc.TextModelStub(ch).Predict(
            text_model_pb2.PredictRequest(text=text), timeout=10, metadata=md)


def infer(address: str, n: int) -> None:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="features", datatype="FP32", shape=[1, 4],
        contents=oip.InferTensorContents(fp32_contents=[5.1, 3.5, 1.4, 0.2]))
    with grpc.insecure_channel(address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(n):
            stub.ModelInfer(oip.ModelInferRequest(model_name="iris", inputs=[tensor]),
                            timeout=10, metadata=[("application", "classifier")])


def wait_until(fn: Callable[[], T | None], timeout: float = 15.0, what: str = "") -> T:
    """Poll `fn` until it returns something truthy (bounded in time)."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = fn()
        except Exception as e:  # the page is re-rendering: an element went stale
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or fn}: last {last!r}")


def make_browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = make_browser()
    try:
        yield driver
    finally:
        driver.quit()


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard-screenshots"


@pytest.fixture(scope="session")
def shots() -> Path:
    """Where screenshots go: `test-artifacts/dashboard-screenshots/` in the checkout (ignored
    by git; pytest's own tmp dirs are pruned after three runs)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {ARTIFACTS}")
    return ARTIFACTS


def screenshot(driver: Any, folder: Path, name: str, full: bool = True) -> Path:
    path = folder / f"{name}.png"
    if full:  # the whole page, not only the window
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(int(height) + 40, 600), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    print(f"screenshot: {path}")
    return path
