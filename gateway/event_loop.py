"""The gateway process's event loop: uvloop when configured and installed, else asyncio's.

grpc.aio and aiohttp schedule several loop callbacks and a selector wake-up for every call;
uvloop does that in C. `make bench` measures the difference (its paired row `external, event
loop uvloop vs asyncio`): on the 2 shared cores of the bench machine, 1.05-1.12x the calls/s at
~7% less gateway CPU per call through external replicas. Its timers fire up to ~1 ms early,
though, and the mux stream to local replicas then gathers fewer frames per write (local calls
0.88x): asyncio's loop is the default.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

UVLOOP = "uvloop"
ASYNCIO = "asyncio"


def loop_factory(wanted: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """A factory for the loop `wanted` names, and what to warn when it is not that loop
    (uvloop asked for and not importable: the gateway runs on asyncio's loop)."""
    if wanted == UVLOOP:
        if fork_support_on(os.environ):
            return asyncio.new_event_loop, (
                "running on asyncio's event loop: proxy.event_loop is uvloop, but "
                "GRPC_ENABLE_FORK_SUPPORT is on, and uvloop's spawn of a replica process then "
                "crashes it now and then (unset it, or set event_loop: asyncio)")
        try:
            import uvloop
        except ImportError as e:
            return asyncio.new_event_loop, (
                f"running on asyncio's event loop: proxy.event_loop is uvloop, which cannot be "
                f"imported ({e}); install it (`pip install uvloop`) or set event_loop: asyncio")
        return uvloop.new_event_loop, ""
    return asyncio.new_event_loop, ""


FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"
fork_env_set_here = False
"""True when `disarm_fork_handlers` set FORK_ENV: replica processes do not inherit it."""


def disarm_fork_handlers() -> None:
    """Turn grpc's fork handlers off unless the user chose; before grpc is imported.

    They serve a child that goes on using grpc, and the gateway's children (replicas) exec at
    once. On uvloop, whose spawn forks with them armed, ~1 child in 13 died of SIGSEGV before
    its exec (tests/test_event_loop.py). A user's setting is kept, and then `loop_factory`
    picks asyncio's loop.
    """
    global fork_env_set_here
    if FORK_ENV not in os.environ:
        os.environ[FORK_ENV] = "false"
        fork_env_set_here = True


_GRPC_FALSE = frozenset({"0", "f", "false", "n", "no"})
"""What grpc reads as false. It reads anything it cannot parse ("", "on", "2") as its default,
which arms the handlers."""


def fork_support_on(env: Mapping[str, str]) -> bool:
    """grpc's fork handlers are armed (gateway/cli.py turns them off unless the user set it)."""
    value = env.get(FORK_ENV)
    # ASCII whitespace only, as grpc strips it: a no-break space keeps grpc from reading it.
    return value is None or value.strip(" \t\n\v\f\r").lower() not in _GRPC_FALSE


def running_loop_name() -> str:
    """`uvloop` or `asyncio`: what the running loop is (not what was asked for)."""
    module = type(asyncio.get_running_loop()).__module__
    return UVLOOP if module.startswith(UVLOOP) else ASYNCIO
