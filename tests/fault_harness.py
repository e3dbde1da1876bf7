"""The fault suite's tools: a steady, bounded load; a TCP relay that can black-hole or refuse;
and the table of figures `make faults` prints (tests/conftest.py prints RESULTS at the end)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field

import grpc

from gateway.pb import text_model_pb2, text_model_pb2_grpc


@dataclass
class CaseResult:
    name: str
    sent: int
    ok: int
    failed: dict[str, int]
    recover_s: float | None
    """From the fault to the end of the last failed call (0: nothing failed)."""
    note: str = ""


RESULTS: list[CaseResult] = []


def table() -> str:
    head = f"{'case':<44} {'sent':>6} {'OK':>6}  {'failed by status':<36} {'recover':>8}  note"
    rows = [head, "-" * len(head)]
    for r in RESULTS:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(r.failed.items())) or "-"
        rec = "-" if r.recover_s is None else f"{r.recover_s:.2f}s"
        rows.append(f"{r.name:<44} {r.sent:>6} {r.ok:>6}  {failed:<36} {rec:>8}  {r.note}")
    return "\n".join(rows)


@dataclass
class SteadyLoad:
    """`rate` Predict calls a second, at most `max_in_flight` at once, each with a deadline."""

    address: str
    app: str = "text"
    rate: float = 40.0
    max_in_flight: int = 8
    deadline_s: float = 2.0
    sleep_s: float = 0.02
    """Model time per call, so that calls are in flight when a fault strikes."""
    calls: list[tuple[float, float, str]] = field(default_factory=list)
    details: list[tuple[float, str]] = field(default_factory=list)
    """(start, status and details) of the first failed calls, for diagnosis."""
    _task: asyncio.Task[None] | None = None
    _stop: bool = False

    async def _one(self, stub: text_model_pb2_grpc.TextModelStub, gate: asyncio.Semaphore
                   ) -> None:
        start = time.monotonic()
        try:
            await stub.Predict(text_model_pb2.PredictRequest(text="good", sleep_s=self.sleep_s),
                               metadata=(("application", self.app),), timeout=self.deadline_s)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            if len(self.details) < 200:
                self.details.append((start, f"{code}: {e.details()}"))
        finally:
            gate.release()
        self.calls.append((start, time.monotonic(), code))

    async def _run(self) -> None:
        gate = asyncio.Semaphore(self.max_in_flight)
        pending: set[asyncio.Task[None]] = set()
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = text_model_pb2_grpc.TextModelStub(ch)
            period = 1.0 / self.rate
            next_at = time.monotonic()
            while not self._stop:
                await gate.acquire()  # bounded: a hung upstream slows the load, never piles up
                t = asyncio.ensure_future(self._one(stub, gate))
                pending.add(t)
                t.add_done_callback(pending.discard)
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic() - period)
            if pending:
                await asyncio.wait(pending, timeout=self.deadline_s + 5)

    def start(self) -> SteadyLoad:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await asyncio.wait_for(self._task, self.deadline_s + 10)

    def failures_since(self, t: float) -> list[tuple[float, float, str]]:
        return [c for c in self.calls if c[2] != "OK" and c[1] >= t]

    def ok_after(self, t: float) -> int:
        return sum(1 for c in self.calls if c[2] == "OK" and c[0] >= t)

    async def wait_ok(self, n: int, after: float, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.ok_after(after) < n:
            if time.monotonic() > end:
                raise AssertionError(f"fewer than {n} OK calls after the fault in {timeout}s: "
                                     f"{self.summary('?', after)}")
            await asyncio.sleep(0.05)

    def summary(self, name: str, fault_at: float, note: str = "") -> CaseResult:
        failed = collections.Counter(c[2] for c in self.calls if c[2] != "OK")
        late = self.failures_since(fault_at)
        recover = max((c[1] for c in late), default=fault_at) - fault_at
        return CaseResult(name, len(self.calls), sum(1 for c in self.calls if c[2] == "OK"),
                          dict(failed), recover, note)


class Relay:
    """A TCP relay to `target` on loopback. `blackhole()`: keep every connection open and
    forward nothing (a silent network); `refuse()`: close the listener and every
    connection; `resume()`: forward again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blackholed = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if self.blackholed:
                    continue  # swallowed: the peer waits for an answer that never comes
                w.write(data)
                await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.blackholed:
            self._writers.add(w)  # accepted, never answered
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.close()
            return
        self._writers.update((w, uw))
        for t in (asyncio.ensure_future(self._pipe(r, uw)),
                  asyncio.ensure_future(self._pipe(ur, w))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def blackhole(self) -> None:
        self.blackholed = True

    async def refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()
        for t in list(self._tasks):
            t.cancel()

    async def close(self) -> None:
        await self.refuse()
