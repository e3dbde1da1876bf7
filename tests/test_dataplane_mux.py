"""The call path to local replicas keeps plain gRPC's behaviour over both transports (mux and
grpc): message-size limits per call, sync servicer methods, done callbacks, initial metadata,
cancels that reach the replica. Real gateway, real replica processes, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from examples.models import TextModel
from gateway.dataplane.mux import MuxServer, capture_unary_handlers
from gateway.dataplane.replicas import UNARY_UNARY, Replica, channel_options
from gateway.pb import replica_control_pb2_grpc, text_model_pb2_grpc
from gateway.runtime.replica import _Control
from tests.conftest import PredictRequest, md, text_stub

PREDICT = "/demo.text.TextModel/Predict"
LIMIT = 64 * 1024


@pytest.fixture(params=["mux", "grpc"])
def start_gateway(request: pytest.FixtureRequest, start_gateway: Any) -> Any:
    def start(apps: list[dict[str, Any]], **top: Any) -> Any:
        proxy = {**top.pop("proxy", {}), "local_transport": request.param}
        return start_gateway(apps, proxy=proxy, **top)

    return start


def app(name: str, cls: str, **dep: Any) -> dict[str, Any]:
    d = {"name": cls, "import_path": f"tests.dataplane_models:{cls}", "num_replicas": 1, **dep}
    return {"name": name, "deployments": [d]}


async def outcome(call: Any) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details()}"


async def test_messages_near_the_limit_fail_no_other_call(start_gateway: Any) -> None:
    """Item 1: batches respect max_message_bytes; one big message breaks nothing else."""
    apps = [app("echo", "Echo", max_ongoing_requests=32)]
    async with start_gateway(apps, proxy={"max_message_bytes": LIMIT}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        assert await outcome(stub.Predict(PredictRequest(text="warm"), metadata=md("echo"))) == "OK"
        # A request just under the limit, beside two slow innocent calls on the same replica.
        innocents = [stub.Predict(PredictRequest(text="i", sleep_s=0.5), metadata=md("echo"),
                                  timeout=10) for _ in range(2)]
        await asyncio.sleep(0.1)
        big = await stub.Predict(PredictRequest(text="x" * (LIMIT - 40)), metadata=md("echo"),
                                 timeout=10)
        assert len(big.label) == LIMIT - 40
        assert [await outcome(c) for c in innocents] == ["OK", "OK"]
        big = await stub.Predict(PredictRequest(repeat=LIMIT - 40), metadata=md("echo"),
                                 timeout=10)
        assert len(big.label) == LIMIT - 40
        # Many concurrent requests, then responses, each 60% of the limit: never one message.
        reqs = [stub.Predict(PredictRequest(text="r" * (LIMIT * 6 // 10)), metadata=md("echo"),
                             timeout=10) for _ in range(12)]
        assert [await outcome(c) for c in reqs] == ["OK"] * 12
        resps = [stub.Predict(PredictRequest(repeat=LIMIT * 6 // 10, sleep_s=0.05),
                              metadata=md("echo"), timeout=10) for _ in range(12)]
        assert [await outcome(c) for c in resps] == ["OK"] * 12
        # A response over the limit fails its own call only, as over plain gRPC.
        over = stub.Predict(PredictRequest(repeat=LIMIT + 10), metadata=md("echo"), timeout=10)
        beside = stub.Predict(PredictRequest(text="b", sleep_s=0.2), metadata=md("echo"),
                              timeout=10)
        got = await outcome(over)
        assert got.startswith("RESOURCE_EXHAUSTED") and "larger than max" in got, got
        assert await outcome(beside) == "OK"
        r = await stub.Predict(PredictRequest(text="small"), metadata=md("echo"), timeout=10)
        assert r.label == "small"


async def test_sync_servicer_methods_run_on_threads(start_gateway: Any) -> None:
    """Item 5: abort() stops a plain method; plain methods run in parallel off the loop."""
    async with start_gateway([app("sync", "SyncText")]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        got = await outcome(stub.Predict(PredictRequest(fail_code=5), metadata=md("sync"),
                                         timeout=10))
        assert got == "NOT_FOUND: no such model"
        # Each call waits at a barrier for the other: only parallel calls both get through.
        pair = [stub.Predict(PredictRequest(text="together"), metadata=md("sync"), timeout=20)
                for _ in range(2)]
        results = await asyncio.gather(*pair)
        assert [r.label for r in results] == ["ok", "ok"]
        assert all(r.replica != "MainThread" for r in results)


async def messages(call: Any) -> tuple[list[str], str]:
    """The labels a streaming call received, and how it ended."""
    got: list[str] = []
    try:
        async for m in call:
            got.append(m.label)
        return got, "OK"
    except grpc.aio.AioRpcError as e:
        return got, f"{e.code().name}: {e.details()}"


async def test_sync_streaming_methods_stream_and_abort(start_gateway: Any) -> None:
    """9b item 1: plain methods of every shape send their messages; abort() ends the call
    with its code after the messages sent before it, as on a plain grpc.aio server."""
    async with start_gateway([app("sync", "SyncText")]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        sync = md("sync")

        async def reqs(*texts: str) -> Any:
            for t in texts:
                yield PredictRequest(text=t)

        assert await outcome(stub.Predict(PredictRequest(fail_code=5), metadata=sync,
                                          timeout=10)) == "NOT_FOUND: no such model"
        got = await messages(stub.PredictStream(PredictRequest(repeat=3), metadata=sync,
                                                timeout=10))
        assert got == (["stream"] * 3, "OK")
        r = await stub.PredictBatch(reqs("a", "b"), metadata=sync, timeout=10)
        assert r.label == "a b"
        assert await outcome(stub.PredictBatch(reqs("a", "fail"), metadata=sync,
                                               timeout=10)) == "NOT_FOUND: batch aborted"
        got = await messages(stub.Chat(reqs("a", "b"), metadata=sync, timeout=10))
        assert got == (["a", "b"], "OK")
        for _ in range(5):  # the abort follows a message still on its way: no race
            got = await messages(stub.PredictStream(PredictRequest(repeat=3, fail_code=5),
                                                    metadata=sync, timeout=10))
            assert got == (["stream"], "NOT_FOUND: stream aborted")
            got = await messages(stub.Chat(reqs("a", "fail", "c"), metadata=sync, timeout=10))
            assert got == (["a"], "NOT_FOUND: chat aborted")
        # A cancelled endless stream stops its generator (its thread goes back to the pool).
        closed = int((await stub.Predict(PredictRequest(text="closed"), metadata=sync)).label)
        call = stub.PredictStream(PredictRequest(repeat=1 << 30), metadata=sync, timeout=10)
        assert (await call.read()).label == "stream"
        call.cancel()
        now = closed
        for _ in range(50):
            now = int((await stub.Predict(PredictRequest(text="closed"), metadata=sync)).label)
            if now > closed:
                break
            await asyncio.sleep(0.1)
        assert now == closed + 1


async def test_servicer_mistakes_get_an_answer_and_free_the_slot(start_gateway: Any) -> None:
    """9b item 2: a return value or status the replica cannot send is answered at once, as
    over plain gRPC, even without a deadline; the call's slot and done callbacks follow."""
    apps = [app("bad", "Mistakes", max_ongoing_requests=1),
            app("sync", "SyncMistakes", max_ongoing_requests=1)]
    async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)

        async def call(name: str, text: str) -> str:
            # No deadline: a missing answer would hang; bounded here instead.
            return await asyncio.wait_for(
                outcome(stub.Predict(PredictRequest(text=text), metadata=md(name))), 10)

        unexpected = "UNKNOWN: Unexpected <class"
        not_a_message = ("UNKNOWN: Unexpected <class 'TypeError'>: descriptor 'SerializeToString'"
                         " for 'google._upb._message.Message' objects doesn't apply to a 'dict'"
                         " object")
        for text in ("dict", "md-int-key", "md-not-pairs", "initial-md-bad"):
            got = await call("bad", text)
            assert got.startswith(unexpected), (text, got)
        assert await call("sync", "dict") == not_a_message
        assert await call("bad", "set-code-int") == "NOT_FOUND: "
        got = await call("bad", "details-int")
        assert got.startswith("NOT_FOUND: Unexpected <class 'TypeError'>"), got
        # max_ongoing_requests=1: a slot still held would queue these until their deadline.
        assert await outcome(stub.Predict(PredictRequest(text="fine"), metadata=md("bad"),
                                          timeout=5)) == "OK"
        assert await outcome(stub.Predict(PredictRequest(text="fine"), metadata=md("sync"),
                                          timeout=5)) == not_a_message
        count = ""
        for _ in range(50):  # over plain gRPC the callbacks run just after the call ends
            r = await stub.Predict(PredictRequest(text="count"), metadata=md("bad"), timeout=5)
            count = r.label
            if count == "7":
                break
            await asyncio.sleep(0.1)
        assert count == "7"  # one per call above


async def test_servicer_timeout_error_is_not_the_deadline(start_gateway: Any) -> None:
    """9b item 3: a TimeoutError the method raises itself is UNKNOWN, as over plain gRPC;
    only the call's own deadline is DEADLINE_EXCEEDED."""
    apps = [app("bad", "Mistakes"), app("sync", "SyncMistakes")]
    async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        own = "UNKNOWN: Unexpected <class 'TimeoutError'>: "
        for timeout in (None, 10.0):
            for name, text, details in (("bad", "timeout", "backend timed out"),
                                        ("bad", "wait-for", ""),
                                        ("sync", "timeout", "backend timed out")):
                got = await asyncio.wait_for(outcome(stub.Predict(
                    PredictRequest(text=text), metadata=md(name), timeout=timeout)), 10)
                assert got == own + details, (name, text, timeout)
        got = await outcome(stub.Predict(PredictRequest(text="sleep"), metadata=md("sync"),
                                         timeout=0.3))
        assert got.startswith("DEADLINE_EXCEEDED"), got


async def test_done_callbacks_fire(start_gateway: Any) -> None:
    """Item 6: context.add_done_callback runs when a call ends, whichever transport."""
    async with start_gateway([app("hooks", "Hooks")]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        for fail in (0, 0, 9):
            await outcome(stub.Predict(PredictRequest(text="a", fail_code=fail),
                                       metadata=md("hooks"), timeout=10))
        count = ""
        for _ in range(50):  # over plain gRPC the callbacks run just after the call ends
            r = await stub.Predict(PredictRequest(text="count"), metadata=md("hooks"), timeout=10)
            count = r.label
            if count == "3":
                break
            await asyncio.sleep(0.1)
        assert count == "3"


async def test_replica_initial_metadata_reaches_the_client(start_gateway: Any) -> None:
    """Item 9: what the replica sends as initial metadata, the client gets as such."""
    async with start_gateway([app("hooks", "Hooks")]) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        call = stub.Predict(PredictRequest(text="a"), metadata=md("hooks"), timeout=10)
        assert (await call).label == "ok"
        assert dict(await call.initial_metadata()).get("x-model-version") == "7"
        call = stub.Predict(PredictRequest(text="a", fail_code=9), metadata=md("hooks"),
                            timeout=10)
        assert (await outcome(call)).startswith("FAILED_PRECONDITION")
        assert dict(await call.initial_metadata()).get("x-model-version") == "7"
        stream = stub.PredictStream(PredictRequest(text="a"), metadata=md("hooks"), timeout=10)
        assert [m.index async for m in stream] == [0, 1]
        assert dict(await stream.initial_metadata()).get("x-model-version") == "7"


class _Counting(TextModel):
    def __init__(self) -> None:
        super().__init__()
        self.started = self.cancelled = self.finished = 0

    async def Predict(self, request: Any, context: Any) -> Any:
        self.started += 1
        try:
            await asyncio.sleep(request.sleep_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return await super().Predict(PredictRequest(text="good"), context)


@contextlib.asynccontextmanager
async def mux_replica(servicer: Any) -> AsyncIterator[Replica]:
    """An in-process replica: a grpc.aio server with the runtime's MuxServer in front of
    `servicer`, and the gateway's `Replica` for it (mux on)."""
    server = grpc.aio.server(options=channel_options(32 << 20))
    text_model_pb2_grpc.add_TextModelServicer_to_server(servicer, server)
    mux = MuxServer(capture_unary_handlers([text_model_pb2_grpc.add_TextModelServicer_to_server],
                                           servicer), 32 << 20)
    replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(_Control(servicer, mux), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rep = Replica("t", "D", "t#D#0", f"127.0.0.1:{port}", 32 << 20, is_local=True, mux=True)
    try:
        yield rep
    finally:
        await rep.close()
        await server.stop(0)


async def test_cancel_while_the_call_frame_is_written_reaches_the_replica() -> None:
    """Item 7: a call cancelled in the middle of its frame's write is cancelled upstream."""
    servicer = _Counting()
    async with mux_replica(servicer) as rep:
        send = rep.callable(PREDICT, UNARY_UNARY)
        await send(PredictRequest(text="warm").SerializeToString(), metadata=(), timeout=5)
        for _ in range(3):
            big = PredictRequest(text="x" * (8 << 20), sleep_s=0.5).SerializeToString()
            call = send(big, metadata=(), timeout=None)
            await asyncio.sleep(0)  # the writer task starts writing the 8 MB frame
            call.cancel()
            end = time.monotonic() + 5
            while rep._mux is not None and rep._mux.writing and time.monotonic() < end:
                await asyncio.sleep(0.01)  # the next call's write starts on an idle stream
        end = time.monotonic() + 5
        while time.monotonic() < end and servicer.cancelled < servicer.started - 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.7)  # long enough for an uncancelled call to finish
        assert servicer.finished == 1, "only the warm-up call may run to completion"
        # The stream is fine afterwards.
        out = await send(PredictRequest(text="again").SerializeToString(), metadata=(),
                         timeout=5)
        assert out
