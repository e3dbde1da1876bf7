"""Memory profiling with memray, switched on by an environment variable."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from gateway.logs.settings import ENV_MEMORY_PROFILING, safe_name

log = logging.getLogger("gateway.logs")


def memory_profiling_enabled(env: Mapping[str, str]) -> bool:
    return env.get(ENV_MEMORY_PROFILING, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def memory_profiler(logs_dir: Path | str, name: str, env: Mapping[str, str]) -> Iterator[
    Path | None
]:
    """A memray Tracker writing `<logs_dir>/memray_<name>_<pid>.bin`, when switched on by
    GATEWAY_ENABLE_MEMORY_PROFILING (like RAY_SERVE_ENABLE_MEMORY_PROFILING)."""
    if not memory_profiling_enabled(env):
        yield None
        return
    try:
        import memray
    except ImportError:
        log.warning("%s is set but memray is not installed "
                    "(pip install 'grpc-observability-gateway[memray]')", ENV_MEMORY_PROFILING)
        yield None
        return
    path = _free_path(Path(logs_dir), f"memray_{safe_name(name)}_{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with memray.Tracker(str(path), follow_fork=False):
        log.info("memory profiling with memray into %s", path)
        yield path


def _free_path(folder: Path, stem: str) -> Path:
    """`<stem>.bin`, or `<stem>.<n>.bin` if taken: a container's gateway is PID 1 on every
    start, and memray will not overwrite the capture of an earlier run."""
    path = folder / f"{stem}.bin"
    n = 1
    while path.exists() and n < 10_000:
        path = folder / f"{stem}.{n}.bin"
        n += 1
    return path
