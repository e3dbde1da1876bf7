"""Method sources that must not hang, exhaust memory or override the gateway's own methods."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config_source import DeployError
from gateway.dataplane import method_sources
from gateway.dataplane.method_sources import MethodSourceError, load_descriptor_set
from tests.test_methods_sources import echo_app, echo_replica


def test_descriptor_set_fifo_and_device_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "set.pb"
    os.mkfifo(fifo)
    with pytest.raises(MethodSourceError, match="not a regular file"):
        load_descriptor_set(fifo, "descriptor_sets[0]")
    with pytest.raises(MethodSourceError, match="not a regular file"):
        load_descriptor_set("/dev/zero", "descriptor_sets[0]")


def test_descriptor_set_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.pb"
    big.write_bytes(b"\0" * 2048)
    monkeypatch.setattr(method_sources, "MAX_DESCRIPTOR_SET_BYTES", 1024)
    with pytest.raises(MethodSourceError, match="larger than"):
        load_descriptor_set(big, "descriptor_sets[0]")


def test_gateway_check_refuses_a_fifo_descriptor_set(tmp_path: Path) -> None:
    fifo = tmp_path / "set.pb"
    os.mkfifo(fifo)
    cfg = tmp_path / "gw.yaml"
    for target in (fifo, "/dev/zero"):
        cfg.write_text(f"descriptor_sets: [{target}]\napplications: []\n")
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(cfg)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert "descriptor_sets[0] is not a regular file" in done.stderr


async def test_deploy_with_a_fifo_descriptor_set_fails_fast(
        start_gateway: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "set.pb"
    os.mkfifo(fifo)
    async with echo_replica() as port, start_gateway(echo_app(port)) as gw:
        bad = gw.config.model_copy(update={"descriptor_sets": [str(fifo)]})
        with pytest.raises(DeployError, match="not a regular file"):
            await asyncio.wait_for(gw.apply(bad), 10)
