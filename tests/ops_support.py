"""Support for the tests that run the gateway as users do: `gateway run` as a real process
(`GatewayProcess`), the config it gets (`run_config`, `write_config`), and a chatty model."""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from examples.models import TextModel
from gateway.pb import text_model_pb2

REPO = Path(__file__).resolve().parents[1]
PREDICT = "/demo.text.TextModel/Predict"

RUN_CONFIG = """
proxy: {host: 127.0.0.1, port: 0PROXY}
admin: {port: 0}
metrics: {prometheus: {port: 0}}
logging_config: {logs_dir: LOGS}
applications:
  - name: text
    deployments:
      - {name: TextModel, import_path: "IMPORT_PATH", num_replicas: REPLICASDEPLOYMENT}
"""


def run_config(replicas: int = 1, import_path: str = "examples.models:TextModel",
               deployment: str = "", proxy: str = "") -> str:
    """A config for `gateway run` in a test: every listener on port 0, one application `text`.
    `deployment` and `proxy` add keys (`", graceful_shutdown_timeout_s: 0.5"`); the logs
    directory is filled in by `write_config`."""
    return (RUN_CONFIG.replace("IMPORT_PATH", import_path)
            .replace("REPLICAS", str(replicas)).replace("DEPLOYMENT", deployment)
            .replace("PROXY", proxy))


def write_config(folder: Path, text: str, name: str = "serve.yaml") -> Path:
    """`text` as `folder/name`, its logs going to `folder/logs`."""
    cfg = folder / name
    cfg.write_text(text.replace("LOGS", str(folder / "logs")))
    return cfg


class Chatty(TextModel):
    """TextModel that logs (INFO and WARNING) and prints inside every Predict call."""

    async def Predict(
        self, request: text_model_pb2.PredictRequest, context: Any
    ) -> text_model_pb2.PredictResponse:
        logger = logging.getLogger("chatty")
        logger.info("hello from the model: %s", request.text)
        logger.warning("a warning from the model")
        print(f"printed by the model: {request.text}")
        return await super().Predict(request, context)


class GatewayProcess:
    """`gateway run CONFIG` as a child process; its console is read by a thread (so the pipe
    never fills) and kept in `lines`."""

    def __init__(
        self,
        config_path: Path,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        cwd: Path = REPO,
        new_session: bool = False,
        wait_serving: bool = True,
    ) -> None:
        argv = command or [sys.executable, "-m", "gateway.cli"]
        self.proc = subprocess.Popen(
            [*argv, "run", str(config_path)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=new_session,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""
        self.admin = ""
        if wait_serving:
            self.address = self.wait_for(r"serving gRPC on (\S+)", 60)
            self.admin = self.wait_for(r"admin service on (\S+)", 5)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def replica_pids(self) -> list[int]:
        """The local replica processes the gateway started (its children running them)."""
        with contextlib.suppress(psutil.Error):
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)
                    if "gateway.runtime.replica" in " ".join(c.cmdline())]
        return []

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}; console:\n" + self.console())

    def console(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
