"""Big REST bodies are converted off the event loop.

Turning a JSON body into tensors (and an answer back into JSON) grows with the body: a few MiB
takes a second or more, much of it inside C calls that hold the GIL (`json.loads`,
`json.dumps`, protobuf's serializer), so a thread would still stall every gRPC call on the
loop. Bodies above `PROCESS_BYTES` are therefore converted in a small process pool
(`WORKERS` processes, started with `spawn`, which is safe beside grpc's threads): the inputs
and outputs are plain bytes, so only they cross. The pool is started by the first body above
`INLINE_BYTES` and used once its first worker is up (starting one takes a second or more);
until then, and for bodies between the two sizes (their GIL holds are tens of ms), a small
thread pool converts. Small bodies stay inline: the hop costs more than converting them.

JSON transcoding needs the method's descriptor (possibly from reflection), which does not cross
to another process: those conversions use a small thread pool (`run_thread`).

Both pools are bounded in workers; the conversions waiting for them are bounded by the HTTP
connection cap (`http.max_connections`), one request per connection at a time.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from gateway.ingress.http.errors import RestError

T = TypeVar("T")
log = logging.getLogger("gateway.http")

INLINE_BYTES = 64 * 1024
"""Bodies up to this size are converted on the loop."""
PROCESS_BYTES = 1024 * 1024
"""Bodies above this size are converted in a worker process (once one is up)."""
WORKERS = 2
PARENT_CHECK_S = 1.0


def _worker_init(parent: int) -> None:
    # Ctrl-C reaches the whole process group: the gateway stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    """A gateway killed outright (SIGKILL, OOM) cannot stop its workers: they leave on their
    own once it is gone (the replicas do the same)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class Offload:
    """`await run(size, fn, *args)`: fn(*args), in a worker process when `size` is large."""

    def __init__(self, workers: int = WORKERS, inline_bytes: int = INLINE_BYTES,
                 process_bytes: int = PROCESS_BYTES) -> None:
        self.inline_bytes = inline_bytes
        self.process_bytes = process_bytes
        self._warm = False
        self._workers = workers
        self._procs: ProcessPoolExecutor | None = None
        self._threads: ThreadPoolExecutor | None = None
        self.offloaded = 0
        """Conversions run off the loop (for tests and status)."""

    async def run(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """`fn` must be a module-level function of picklable arguments and result."""
        if size <= self.inline_bytes:
            return fn(*args)
        if self._procs is None:  # made on first use: most gateways never see a big body
            self._procs = ProcessPoolExecutor(
                self._workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(os.getpid(),))
            self._procs.submit(int).add_done_callback(self._warmed)
        if size <= self.process_bytes or not self._warm:
            return await self.run_thread(size, fn, *args)
        self.offloaded += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._procs, fn, *args)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the next big body gets a fresh pool.
            log.error("HTTP body conversion worker died; restarting the pool")
            pool, self._procs, self._warm = self._procs, None, False
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            raise RestError(503, "the body conversion worker stopped: retry") from None

    @property
    def warm(self) -> bool:
        """A worker process is up (big bodies go to it)."""
        return self._warm

    def _warmed(self, fut: Future[int]) -> None:
        self._warm = not fut.cancelled() and fut.exception() is None

    async def run_thread(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """`run` for conversions that cannot cross processes (they need descriptors)."""
        if size <= self.inline_bytes:
            return fn(*args)
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self._workers, thread_name_prefix="http-convert")
        self.offloaded += 1
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def close(self) -> None:
        procs, threads, self._procs, self._threads = self._procs, self._threads, None, None
        self._warm = False
        if procs is not None:
            procs.shutdown(wait=False, cancel_futures=True)
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
