"""Support for the logging, admin and draining tests: a chatty model and a real `gateway run`."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from examples.models import TextModel
from gateway.pb import text_model_pb2

REPO = Path(__file__).resolve().parents[1]
PREDICT = "/demo.text.TextModel/Predict"


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
    ) -> None:
        argv = command or [sys.executable, "-m", "gateway.cli"]
        self.proc = subprocess.Popen(
            [*argv, "run", str(config_path)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = self.wait_for(r"serving gRPC on (\S+)", 60)
        self.admin = self.wait_for(r"admin service on (\S+)", 5)

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
