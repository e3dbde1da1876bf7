"""Calls of unknown shape (gateway/dataplane/peek.py): one message and its end goes upstream
as unary-stream; everything else as a stream, every message in order, nothing held back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from gateway.dataplane.call import CallRecord
from gateway.dataplane.peek import PEEK_S
from gateway.dataplane.replicas import STREAM_STREAM, UNARY_STREAM, Replica

MD = (("application", "echo"),)


@contextlib.asynccontextmanager
async def replica() -> AsyncIterator[int]:
    """An external replica of raw-bytes methods, without reflection: all unknown."""

    async def say(request: bytes, ctx: Any) -> bytes:
        return request

    async def count(requests: AsyncIterator[bytes], ctx: Any) -> bytes:
        return str(len([r async for r in requests])).encode()

    async def chat(requests: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    async def push(requests: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        yield b"hello"  # the server speaks first
        async for r in requests:
            yield r

    handler = grpc.method_handlers_generic_handler("peek.T", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.stream_unary_rpc_method_handler(count),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Push": grpc.stream_stream_rpc_method_handler(push),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


def app(port: int) -> list[dict[str, Any]]:
    return [{"name": "echo", "deployments": [
        {"name": "Echo", "targets": [f"127.0.0.1:{port}"], "health_check_period_s": 0.5}]}]


@pytest.fixture
def shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The upstream shape of every call the gateway makes (the real callable, recorded)."""
    seen: list[tuple[str, int]] = []
    real = Replica.callable

    def spy(self: Replica, path: str, shape: int) -> Any:
        seen.append((path, shape))
        return real(self, path, shape)

    monkeypatch.setattr(Replica, "callable", spy)
    return seen


async def test_one_message_goes_upstream_as_unary_stream(
        start_gateway: Any, shapes: list[tuple[str, int]]) -> None:
    records: list[CallRecord] = []
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        gw.proxy.observers.append(records.append)
        for i in range(5):
            assert await ch.unary_unary("/peek.T/Say")(b"hi%d" % i, metadata=MD) == b"hi%d" % i
        # A client stream of one message is one message, whatever the method's shape.
        one = ch.stream_unary("/peek.T/Count")
        assert await one(iter([b"a"]), metadata=MD) == b"1"
        assert shapes == [("/peek.T/Say", UNARY_STREAM)] * 5 + [("/peek.T/Count", UNARY_STREAM)]
        assert [r.request_bytes for r in records] == [3] * 5 + [1]
        assert all(r.code is grpc.StatusCode.OK for r in records)


async def test_streams_keep_every_message_in_order(
        start_gateway: Any, shapes: list[tuple[str, int]]) -> None:
    records: list[CallRecord] = []
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        gw.proxy.observers.append(records.append)
        count = ch.stream_unary("/peek.T/Count")
        assert await count(iter([b"a", b"b", b"c"]), metadata=MD) == b"3"
        assert await count(iter([]), metadata=MD) == b"0"  # no message at all
        # A client that waits for each answer before it sends again (longer than the peek).
        call = ch.stream_stream("/peek.T/Chat")(metadata=MD)
        got = []
        for m in (b"one", b"two", b"three"):
            await call.write(m)
            got.append(await asyncio.wait_for(call.read(), 10))
            await asyncio.sleep(PEEK_S * 4)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert got == [b"one", b"two", b"three"]
        assert await call.code() == grpc.StatusCode.OK
        assert [s for _, s in shapes] == [STREAM_STREAM] * 3
        assert [r.request_bytes for r in records] == [3, 0, 11]


async def test_a_server_that_speaks_first_is_not_kept_waiting(start_gateway: Any) -> None:
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        call = ch.stream_stream("/peek.T/Push")(metadata=MD)
        # Nothing sent yet: the replica's first message must come through all the same.
        assert await asyncio.wait_for(call.read(), 10) == b"hello"
        await call.write(b"x")
        assert await asyncio.wait_for(call.read(), 10) == b"x"
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_clients_leaving_during_the_peek_leave_nothing_behind(
        start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        assert await ch.unary_unary("/peek.T/Say")(b"before", metadata=MD) == b"before"
        before = set(asyncio.all_tasks())
        for wait in (0.0, PEEK_S / 2, PEEK_S * 2, 0.05):
            call = ch.stream_stream("/peek.T/Chat")(metadata=MD)
            if wait:
                await asyncio.sleep(wait)
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
        for _ in range(100):  # the gateway let every one of them go
            if gw.proxy.ongoing == 0:
                break
            await asyncio.sleep(0.02)
        assert gw.proxy.ongoing == 0
        assert await ch.unary_unary("/peek.T/Say")(b"after", metadata=MD) == b"after"
        for _ in range(100):  # no read the peek started outlives its call
            left = {t for t in set(asyncio.all_tasks()) - before
                    if "anext" in repr(t.get_coro()) or "_wrap_awaitable" in repr(t.get_coro())}
            if not left:
                break
            await asyncio.sleep(0.02)
        assert not left
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()
                or "destroyed but it is pending" in r.getMessage()]


async def test_the_peek_holds_a_message_back_for_peek_s_in_all(
        start_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both reads share one budget: an interactive client (one message, no half-close) gets
    its first answer after PEEK_S at most, not after a wait for each read."""
    from gateway.dataplane import peek

    monkeypatch.setattr(peek, "PEEK_S", 0.4)  # large, so scheduling noise cannot matter
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        call = ch.stream_stream("/peek.T/Chat")(metadata=MD)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(0.25)  # the message comes late in the first read's wait
        await call.write(b"first")
        assert await asyncio.wait_for(call.read(), 10) == b"first"
        waited = loop.time() - t0
        # One budget: answered ~0.4 s after the call opened. A wait per read: ~0.65 s.
        assert waited < 0.55, waited
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF


async def test_a_method_seen_streaming_is_not_peeked_at_again(
        start_gateway: Any, monkeypatch: pytest.MonkeyPatch,
        shapes: list[tuple[str, int]]) -> None:
    """A bidi method pays the peek once, remembered as soon as its call proves it (a second
    message, once the replica has answered): sessions opened while that call is still open
    get their first answer at once."""
    from gateway.dataplane import peek

    monkeypatch.setattr(peek, "PEEK_S", 0.4)
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        loop = asyncio.get_running_loop()
        waits = []
        sessions = []
        for _ in range(3):  # each session stays open
            call = ch.stream_stream("/peek.T/Chat")(metadata=MD)
            sessions.append(call)
            t0 = loop.time()
            await call.write(b"m")
            assert await asyncio.wait_for(call.read(), 10) == b"m"
            waits.append(loop.time() - t0)
            await call.write(b"n")
            assert await asyncio.wait_for(call.read(), 10) == b"n"
        assert waits[0] >= 0.3 and max(waits[1:]) < 0.3, waits
        assert ("echo", "/peek.T/Chat") in gw.proxy.streaming
        for call in sessions:
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        # Single-message calls of other unknown methods still take the cheap way.
        assert await ch.unary_unary("/peek.T/Say")(b"x", metadata=MD) == b"x"
        assert shapes[-1] == ("/peek.T/Say", UNARY_STREAM)
        assert ("echo", "/peek.T/Say") not in gw.proxy.streaming


async def test_a_unary_method_marked_by_a_malformed_call_is_forgotten(
        start_gateway: Any, monkeypatch: pytest.MonkeyPatch,
        shapes: list[tuple[str, int]]) -> None:
    """Two messages to a unary method (its replica answers all the same) mark it, but only
    for REMEMBER_S after the last such call; its well-formed calls do not keep it marked."""
    from gateway.dataplane import peek

    monkeypatch.setattr(peek, "REMEMBER_S", 2.0)  # long enough for a loaded machine
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        bad = ch.stream_stream("/peek.T/Say")
        assert [m async for m in bad(iter([b"a", b"b"]), metadata=MD)] == [b"a"]
        assert ("echo", "/peek.T/Say") in gw.proxy.streaming
        say = ch.unary_unary("/peek.T/Say")
        shapes.clear()
        assert await say(b"x", metadata=MD) == b"x"
        assert shapes == [("/peek.T/Say", STREAM_STREAM)]  # still remembered
        await asyncio.sleep(2.1)
        assert ("echo", "/peek.T/Say") not in gw.proxy.streaming
        assert await say(b"y", metadata=MD) == b"y"
        assert shapes[-1] == ("/peek.T/Say", UNARY_STREAM)


def test_remembered_streaming_methods_are_bounded_per_application(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.dataplane import peek

    s = peek.StreamingMethods()
    for i in range(peek.MAX_STREAMING + 50):
        s.add(("noisy", f"/x.S/M{i}"))
    assert len(s.paths) == peek.MAX_STREAMING and ("noisy", "/x.S/M0") in s
    s.add(("quiet", "/y.S/Chat"))  # another application's method still fits
    assert ("quiet", "/y.S/Chat") in s
    # Expired entries leave the listing (it must not change the dict it reads) and make room.
    now = time.monotonic()
    monkeypatch.setattr(peek.time, "monotonic", lambda: now + peek.REMEMBER_S + 1)
    assert s.paths == set()
    s.add(("noisy", "/x.S/New"))
    assert s.paths == {("noisy", "/x.S/New")}


async def test_a_peek_out_of_time_does_not_mark_a_unary_method_streaming(
        start_gateway: Any, monkeypatch: pytest.MonkeyPatch,
        shapes: list[tuple[str, int]]) -> None:
    """A loaded loop can read a unary client's message and end after PEEK_S: the call goes
    up as a stream, but later calls of the method must still take the cheap way."""
    from gateway.dataplane import peek

    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        say = ch.unary_unary("/peek.T/Say")
        monkeypatch.setattr(peek, "PEEK_S", 0.0)  # every peek runs out of time
        for i in range(5):
            assert await say(b"slow%d" % i, metadata=MD) == b"slow%d" % i
        assert [s for _, s in shapes] == [STREAM_STREAM] * 5
        assert ("echo", "/peek.T/Say") not in gw.proxy.streaming
        monkeypatch.setattr(peek, "PEEK_S", 0.4)
        assert await say(b"fast", metadata=MD) == b"fast"
        assert shapes[-1] == ("/peek.T/Say", UNARY_STREAM)


async def test_what_proves_a_method_streams(start_gateway: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two messages, none at all, or an answer before the client's end: remembered."""
    from gateway.dataplane import peek

    monkeypatch.setattr(peek, "PEEK_S", 0.0)
    async with replica() as port, start_gateway(app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        streaming = gw.proxy.streaming
        count = ch.stream_unary("/peek.T/Count")
        assert await count(iter([b"a"]), metadata=MD) == b"1"
        assert ("echo", "/peek.T/Count") not in streaming  # one message: nothing proved
        assert await count(iter([]), metadata=MD) == b"0"
        assert ("echo", "/peek.T/Count") in streaming
        chat = ch.stream_stream("/peek.T/Chat")
        assert [m async for m in chat(iter([b"x"]), metadata=MD)] == [b"x"]
        assert ("echo", "/peek.T/Chat") not in streaming
        assert [m async for m in chat(iter([b"x", b"y"]), metadata=MD)] == [b"x", b"y"]
        assert ("echo", "/peek.T/Chat") in streaming
        # An answer before the client's end: a bidi client that sends one request and reads
        # the answers (or, here, a unary method's client slow to close: see REMEMBER_S).
        slow_end = ch.stream_stream("/peek.T/Say")(metadata=MD)
        await slow_end.write(b"m")
        assert await asyncio.wait_for(slow_end.read(), 10) == b"m"
        assert ("echo", "/peek.T/Say") in streaming  # at once, not when the call ends
        await slow_end.done_writing()
        assert await slow_end.code() == grpc.StatusCode.OK
        push = ch.stream_stream("/peek.T/Push")(metadata=MD)
        assert await asyncio.wait_for(push.read(), 10) == b"hello"  # before any message
        await push.done_writing()
        assert await push.read() == grpc.aio.EOF
        assert ("echo", "/peek.T/Push") in streaming


async def test_only_methods_a_replica_serves_are_remembered_per_application(
        start_gateway: Any, shapes: list[tuple[str, int]]) -> None:
    """Made-up paths (the replica answers UNIMPLEMENTED) must not fill the memory, and one
    application's bidi method says nothing of another application's method of that name."""
    async with replica() as port:
        apps = [*app(port), {"name": "other", "deployments": [
            {"name": "Other", "targets": [f"127.0.0.1:{port}"]}]}]
        async with start_gateway(apps) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            streaming = gw.proxy.streaming
            junk = ch.stream_stream("/peek.T/Nope")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in junk(iter([b"a", b"b"]), metadata=MD)]
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert not streaming.paths
            chat = ch.stream_stream("/peek.T/Chat")
            assert [m async for m in chat(iter([b"x", b"y"]), metadata=MD)] == [b"x", b"y"]
            assert streaming.paths == {("echo", "/peek.T/Chat")}
            shapes.clear()
            other = (("application", "other"),)
            assert [m async for m in chat(iter([b"z"]), metadata=other)] == [b"z"]
            assert shapes == [("/peek.T/Chat", UNARY_STREAM)]
