"""Servicers for the control-plane tests; replicas import them as `tests.control_models:X`."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from examples.models import TextModel
from gateway.pb import text_model_pb2


class SlowReconfig(TextModel):
    """`reconfigure` blocks the replica (a model loaded synchronously) for `sleep` seconds."""

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        time.sleep(float((user_config or {}).get("sleep", 0)))
        super().reconfigure(user_config)


class BadReconfig(TextModel):
    """`reconfigure` raises when the user_config says `fail`."""

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        if (user_config or {}).get("fail"):
            raise RuntimeError("bad user_config")
        super().reconfigure(user_config)


class SlowStart(TextModel):
    """A model that takes a while to load, and says which model it is."""

    def __init__(self) -> None:
        super().__init__()
        time.sleep(1.0)
        self.prefix = "new-"

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        pass


class Crashing(TextModel):
    """A constructor that always fails: a crash loop."""

    def __init__(self) -> None:
        raise RuntimeError("cannot load the model")


class Loud(TextModel):
    """Writes one 70 KB line and then 300 KB more straight to its stderr (past its logging,
    as a C extension would) in every Predict."""

    async def Predict(
        self, request: text_model_pb2.PredictRequest, context: Any
    ) -> text_model_pb2.PredictResponse:
        if request.text == "loud":
            fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
            os.write(fd, b"L" * 70_000 + b"\n")
            for _ in range(3000):
                os.write(fd, b"x" * 99 + b"\n")
        return await super().Predict(request, context)


class VerySlowStart(TextModel):
    """A model that takes 20 s to load: the gateway is still starting meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        time.sleep(20.0)


class DiesSoon(TextModel):
    """Healthy for a moment, then its process exits: a crash loop of short runs."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        def die() -> None:
            time.sleep(1.0)
            os._exit(3)

        threading.Thread(target=die, daemon=True).start()


class StartsAChild(TextModel):
    """Starts a child process (like a worker pool) that lives until it is killed."""

    def __init__(self) -> None:
        super().__init__()
        import subprocess

        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


class SlowStartThenDies(TextModel):
    """Loads for 1.5 s, then its process exits soon after it serves: a crash loop whose
    load time alone is longer than a (shortened) back-off reset window."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        time.sleep(1.5)

        def die() -> None:
            time.sleep(0.5)
            os._exit(3)

        threading.Thread(target=die, daemon=True).start()
