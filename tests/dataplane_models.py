"""Servicers for the data-plane tests, run in real replica processes (`import_path`) or, with
`python -m tests.dataplane_models PORT NAME LOGFILE`, as an external replica process."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import grpc

from examples.models import TextModel
from gateway.pb import text_model_pb2, text_model_pb2_grpc

PredictResponse = text_model_pb2.PredictResponse


class SyncText(text_model_pb2_grpc.TextModelServicer):
    """Plain (sync) methods, as the generated base class declares them."""

    barrier = threading.Barrier(2, timeout=10)
    closed = 0

    def Predict(self, request: Any, context: Any) -> Any:
        if request.text == "closed":
            return PredictResponse(label=str(SyncText.closed))
        if request.fail_code:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
            return PredictResponse(label="abort did not stop the method")
        if request.text == "together":
            # Passes only when two calls run at the same time, on two threads.
            self.barrier.wait()
        return PredictResponse(label="ok", replica=threading.current_thread().name)

    def PredictStream(self, request: Any, context: Any) -> Any:
        try:
            for i in range(request.repeat):
                if request.fail_code and i == 1:
                    context.abort(grpc.StatusCode.NOT_FOUND, "stream aborted")
                yield PredictResponse(label="stream", index=i)
        finally:
            SyncText.closed += 1

    def PredictBatch(self, request_iterator: Any, context: Any) -> Any:
        texts = [r.text for r in request_iterator]
        if "fail" in texts:
            context.abort(grpc.StatusCode.NOT_FOUND, "batch aborted")
        return PredictResponse(label=" ".join(texts))

    def Chat(self, request_iterator: Any, context: Any) -> Any:
        # Reads all requests first: an abort while the client still sends races in the gateway.
        for i, r in enumerate(list(request_iterator)):
            if r.text == "fail":
                context.abort(grpc.StatusCode.NOT_FOUND, "chat aborted")
            yield PredictResponse(label=r.text, index=i)


class Hooks(TextModel):
    """Done callbacks and initial metadata, through every transport."""

    done = 0

    async def Predict(self, request: Any, context: Any) -> Any:
        if request.text == "count":
            return PredictResponse(label=str(Hooks.done))
        context.add_done_callback(lambda _ctx: setattr(Hooks, "done", Hooks.done + 1))
        await context.send_initial_metadata((("x-model-version", "7"),))
        if request.fail_code:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not ready")
        return PredictResponse(label="ok")

    async def PredictStream(self, request: Any, context: Any) -> Any:
        await context.send_initial_metadata((("x-model-version", "7"),))
        for i in range(2):
            yield PredictResponse(label="ok", index=i)


class Mistakes(TextModel):
    """Servicer bugs grpc answers at once (UNKNOWN); `text` picks one. "count": done callbacks."""

    done = 0

    async def Predict(self, request: Any, context: Any) -> Any:
        t = request.text
        if t == "count":
            return PredictResponse(label=str(Mistakes.done))
        context.add_done_callback(lambda _ctx: setattr(Mistakes, "done", Mistakes.done + 1))
        if t == "dict":
            return {"label": "not a message"}
        if t == "timeout":  # the method's own, not the call's deadline
            raise TimeoutError("backend timed out")
        if t == "wait-for":
            await asyncio.wait_for(asyncio.sleep(5), 0.01)
        if t == "md-int-key":
            context.set_trailing_metadata(((1, "v"),))
        elif t == "md-not-pairs":
            context.set_trailing_metadata((("x-a",),))
        elif t == "initial-md-bad":
            await context.send_initial_metadata(((2, 3),))
        elif t == "set-code-int":
            context.set_code(5)
            return None
        elif t == "details-int":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(404)
        return PredictResponse(label="ok")


class SyncMistakes(text_model_pb2_grpc.TextModelServicer):
    def Predict(self, request: Any, context: Any) -> Any:
        if request.text == "timeout":
            raise TimeoutError("backend timed out")
        if request.text == "sleep":
            time.sleep(1)
        return {"label": "not a message"}


class Echo(TextModel):
    """Answers with the request's text (`repeat` > 0: that many bytes), after `sleep_s`."""

    async def Predict(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(request.sleep_s)
        label = "y" * request.repeat if request.repeat else request.text
        return PredictResponse(label=label)


class Logged(TextModel):
    """Appends `NAME start|done TEXT` to a file per call (an external replica process)."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__()
        self.name, self.path = name, path

    def _log(self, what: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{self.name} {what}\n")

    async def Predict(self, request: Any, context: Any) -> Any:
        self._log(f"start {request.text}")
        await asyncio.sleep(request.sleep_s)
        self._log(f"done {request.text}")
        return PredictResponse(label="done", replica=self.name)


async def _serve(name: str, path: str) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    text_model_pb2_grpc.add_TextModelServicer_to_server(Logged(name, path), server)
    h = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    print(port, flush=True)
    end = time.monotonic() + 60  # never outlives a test run for long
    while time.monotonic() < end:
        await asyncio.sleep(0.2)
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
