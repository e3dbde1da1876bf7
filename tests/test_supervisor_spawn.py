"""A replica start that fails in the gateway itself (the child gone before its secret was
written, no file descriptors left) is a failed start: retried with backoff, never the end of
the replica slot's supervision."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from gateway.pb import text_model_pb2
from tests.conftest import TEXT_APP, gateway_config, md, running_gateway, text_stub

Spawn = Callable[..., Any]


def _replica_spawns(monkeypatch: pytest.MonkeyPatch, spoil: Callable[[int, Spawn, tuple[Any, ...],
                    dict[str, Any]], Any]) -> list[int]:
    """Route replica spawns through `spoil(n, real, args, kwargs)`; returns the spawn count."""
    real = asyncio.create_subprocess_exec
    count = [0]

    async def spawn(*args: Any, **kwargs: Any) -> Any:
        if "gateway.runtime.replica" not in args:
            return await real(*args, **kwargs)
        count[0] += 1
        return await spoil(count[0], real, args, kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    return count


async def _serves(tmp_path: Path) -> str:
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        from grpc import aio

        slots = gw.controller.apps["text"].ingress.slots
        for _ in range(200):  # failed starts are retried after 0.2 s, then 0.4 s
            if all(s.state == "RUNNING" for s in slots):
                break
            await asyncio.sleep(0.1)

        async with aio.insecure_channel(gw.address) as ch:
            r = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                            metadata=md("text"), timeout=20)
        return f"{r.label} {[str(s.state) for s in slots]}"


async def test_a_child_gone_before_its_secret_is_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def gone_at_once(n: int, real: Spawn, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        proc = await real(*args, **kwargs)
        if n <= 2:  # dies (OOM killer, a crash at start) before the gateway writes to it
            proc.kill()
            await proc.wait()
            await asyncio.sleep(0.02)
        return proc

    count = _replica_spawns(monkeypatch, gone_at_once)
    assert await _serves(tmp_path) == "positive ['RUNNING']"
    assert count[0] >= 3
    # How it ended is said (here SIGKILL): a crash at start is told from a failed import.
    assert "exited before it reported (signal 9)" in caplog.text


async def test_out_of_file_descriptors_at_spawn_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_fds(n: int, real: Spawn, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        if n <= 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(*args, **kwargs)

    count = _replica_spawns(monkeypatch, no_fds)
    assert await _serves(tmp_path) == "positive ['RUNNING']"
    assert count[0] == 3


def _pipes() -> int:
    fd_dir = Path("/proc/self/fd")
    n = 0
    for fd in fd_dir.iterdir():
        try:
            n += os.readlink(fd).startswith("pipe:")
        except OSError:
            pass
    return n


async def test_failed_starts_leave_no_pipe_open(tmp_path: Path) -> None:
    """A start that fails before its process is spawned (here the replica's environment
    cannot be made) closes the report pipe: retried for as long as the gateway runs, each
    attempt had left two descriptors open."""
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        slot = gw.controller.apps["text"].ingress.slots[0]
        proc = slot.process
        assert proc is not None and slot.state == "RUNNING"
        attempts = [0]

        def broken_env(*_: Any) -> dict[str, str]:
            attempts[0] += 1
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")

        gw.controller.replica_env = broken_env
        before = _pipes()
        proc.kill()
        for _ in range(100):  # failed starts after 0.2, 0.4, 0.8 s...
            if attempts[0] >= 4:
                break
            await asyncio.sleep(0.1)
        assert attempts[0] >= 4
        assert slot.state == "UNHEALTHY" and "could not be started" in slot.message
        assert _pipes() <= before, "report pipes left open by failed starts"


def test_a_spawn_without_descriptors_to_spare_fails_before_uvloop_starts_it() -> None:
    """uvloop's spawn, out of descriptors part-way, left its socketpairs open for good (and
    said `Errno -1`): the start is refused first, with a message an operator can act on."""
    script = (
        "import os, resource\n"
        "from gateway.control.process import check_fd_headroom\n"
        "used = len(os.listdir('/proc/self/fd'))\n"
        "check_fd_headroom()\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, hard))\n"
        "try:\n"
        "    check_fd_headroom()\n"
        "except OSError as e:\n"
        "    print(e.errno, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{errno.EMFILE} ") and "too few file descriptors" in out.stdout


async def test_a_replica_ending_with_code_0_before_it_reports_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def exits_0(n: int, real: Spawn, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        if n == 1:  # a model that calls sys.exit() at import
            return await real(sys.executable, "-c", "import sys; sys.exit(0)", **kwargs)
        return await real(*args, **kwargs)

    _replica_spawns(monkeypatch, exits_0)
    assert await _serves(tmp_path) == "positive ['RUNNING']"
    assert "exited before it reported (exit code 0)" in caplog.text


async def test_a_large_user_config_reaches_the_replica_off_its_command_line(
        tmp_path: Path) -> None:
    """user_config travels on the replica's stdin: one argument is at most 128 KiB on Linux
    (a larger user_config never started), and argv is public (`ps`), keys included."""
    key = "sk-test-" + "7" * 24
    user_config = {"prefix": "v9-", "api_key": key, "table": "\u6f22" * 40_000}
    app = {"name": "text", "deployments": [{**TEXT_APP["deployments"][0],  # type: ignore[index]
                                            "user_config": user_config}]}
    async with running_gateway(gateway_config([app], tmp_path), tmp_path) as gw:
        from grpc import aio

        slot = gw.controller.apps["text"].ingress.slots[0]
        for _ in range(200):
            if slot.state == "RUNNING":
                break
            await asyncio.sleep(0.1)
        assert slot.state == "RUNNING", slot.message
        async with aio.insecure_channel(gw.address) as ch:
            r = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                            metadata=md("text"), timeout=20)
        assert r.label == "v9-positive"
        assert slot.process is not None
        cmdline = psutil.Process(slot.process.pid).cmdline()
        assert "--user-config-stdin" in cmdline
        assert not any(key in arg or "prefix" in arg for arg in cmdline)
