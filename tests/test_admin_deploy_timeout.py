"""`gateway deploy --timeout` bounds the wait for the gateway's answer."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc


def test_deploy_timeout_is_used(tmp_path: Path) -> None:
    release = threading.Event()

    def deploy(request: bytes, ctx: Any) -> bytes:
        release.wait(20)  # a deploy that takes long (replicas starting)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "gateway.admin.v1.GatewayAdmin", {"Deploy": grpc.unary_unary_rpc_method_handler(
            deploy)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("applications: []\n")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "deploy", str(cfg), "--address",
             f"127.0.0.1:{port}", "--timeout", "1"],
            capture_output=True, text=True, timeout=60, check=False,
            cwd=Path(__file__).parents[1])
    finally:
        release.set()
        server.stop(0)
    assert done.returncode == 3, done.stderr
    assert "did not answer within 1s" in done.stderr
