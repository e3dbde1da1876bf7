"""The no-reflection warning is per deployment: unrelated sources do not silence it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.admin.status import build_status
from tests.test_methods_sources import ECHO_FILES, MD, SAY, echo_app, echo_replica


async def test_unrelated_sources_do_not_silence_the_warning(
        start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    other = tmp_path / "other.proto"
    other.write_text('syntax = "proto3";\npackage unrelated;\nmessage M { string a = 1; }\n'
                     "service S { rpc Do(M) returns (M); }\n")
    top = {"proto_files": {"files": [str(other)], "import_paths": [str(tmp_path)]}}
    async with echo_replica() as port, start_gateway(echo_app(port), **top) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        warning = build_status(gw).applications["echo"].deployments["Echo"].warning
        assert "no gRPC reflection" in warning
        assert any("serve no gRPC reflection" in r.getMessage() for r in caplog.records)
        # Sources that do describe its methods, and a call it answers: the warning goes.
        await gw.apply(gw.config.model_copy(update={"proto_files": type(gw.config.proto_files)(
            **ECHO_FILES)}))
        assert build_status(gw).applications["echo"].deployments["Echo"].warning
        assert await ch.unary_unary(SAY)(b"\n\x02hi", metadata=MD) == b"\n\x02hi"
        assert build_status(gw).applications["echo"].deployments["Echo"].warning == ""
