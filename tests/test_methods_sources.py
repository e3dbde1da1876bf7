"""Methods nobody told the gateway about: `proto_files:` and `descriptor_sets:`, the bounded
labels of unknown methods, and the WARNING a deployment with unknown methods gets."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.admin.status import build_status, from_proto, to_proto
from gateway.config_source import DeployError
from gateway.dataplane import methods as methods_mod
from gateway.dataplane.method_sources import (
    MethodSourceError,
    compile_proto_files,
    load_descriptor_set,
)
from gateway.dataplane.methods import OTHER, MethodTable
from tests.metrics_util import scrape_until

PROTOS = Path(__file__).parent / "protos"
ECHO_FILES = {"files": [str(PROTOS / "echo" / "echo.proto")], "import_paths": [str(PROTOS)]}
SAY = "/testecho.Echo/Say"
CHAT = "/testecho.Echo/Chat"


@contextlib.asynccontextmanager
async def echo_replica() -> AsyncIterator[int]:
    """An external replica serving testecho.Echo as raw bytes: no reflection, no health."""

    async def say(request: bytes, ctx: Any) -> bytes:
        return request

    async def listen(request: bytes, ctx: Any) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield request

    async def gather(requests: AsyncIterator[bytes], ctx: Any) -> bytes:
        return b"".join([r async for r in requests])

    async def chat(requests: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    handler = grpc.method_handlers_generic_handler("testecho.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Listen": grpc.unary_stream_rpc_method_handler(listen),
        "Gather": grpc.stream_unary_rpc_method_handler(gather),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


def echo_app(port: int) -> list[dict[str, Any]]:
    return [{"name": "echo", "deployments": [
        {"name": "Echo", "targets": [f"127.0.0.1:{port}"], "health_check_period_s": 0.5}]}]


MD = (("application", "echo"),)


def write_descriptor_set(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
                    f"--descriptor_set_out={out}", "--include_imports",
                    str(PROTOS / "echo" / "echo.proto")], check=True)
    return out


# -- loading ------------------------------------------------------------------------------


def test_proto_files_compile_with_import_paths() -> None:
    table = MethodTable(())
    for fd in compile_proto_files(ECHO_FILES["files"], ECHO_FILES["import_paths"]):
        table.add_file(fd)
    say, chat, listen = table.get(SAY), table.get(CHAT), table.get("/testecho.Echo/Listen")
    assert say is not None and not say.client_streaming and not say.server_streaming
    assert say.input_type == "testcommon.Text"
    assert chat is not None and chat.client_streaming and chat.server_streaming
    assert listen is not None and listen.server_streaming and not listen.client_streaming
    ping = table.get("/testecho.Echo/Ping")  # a well-known type import needs no -I
    assert ping is not None and ping.input_type == "google.protobuf.Empty"


def test_proto_files_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(MethodSourceError, match=r"common/types.proto"):
        # Without the import path, the import cannot be found.
        compile_proto_files(ECHO_FILES["files"], [str(PROTOS / "echo")])
    with pytest.raises(MethodSourceError, match="is not a file"):
        compile_proto_files([str(tmp_path / "nope.proto")])
    with pytest.raises(MethodSourceError, match="not a directory"):
        compile_proto_files(ECHO_FILES["files"], [str(tmp_path / "nodir")])
    bad = tmp_path / "bad.proto"
    bad.write_text('syntax = "proto3";\nmessage {')
    with pytest.raises(MethodSourceError, match=r"bad.proto"):
        compile_proto_files([str(bad)])
    # Nothing is written next to the protos or into the package.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.proto"]


def test_descriptor_set_loads_and_rejects_garbage(tmp_path: Path) -> None:
    files = load_descriptor_set(write_descriptor_set(tmp_path / "echo.pb"))
    table = MethodTable(())
    for fd in files:
        table.add_file(fd)
    assert table.get(SAY) is not None and table.get(CHAT) is not None
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff not a descriptor set")
    with pytest.raises(MethodSourceError, match="not a descriptor set"):
        load_descriptor_set(junk, "descriptor_sets[0]")
    with pytest.raises(MethodSourceError, match="cannot read"):
        load_descriptor_set(tmp_path / "missing.pb")
    # A set written without --include_imports misses the imported file: said so.
    partial = tmp_path / "partial.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
                    f"--descriptor_set_out={partial}", str(PROTOS / "echo" / "echo.proto")],
                   check=True)
    with pytest.raises(MethodSourceError, match="include_imports"):
        load_descriptor_set(partial)


# -- labels of unknown methods ------------------------------------------------------------


def test_unknown_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods_mod, "MAX_UNKNOWN_PER_SERVICE", 3)
    monkeypatch.setattr(methods_mod, "MAX_UNKNOWN_NAMES", 5)
    t = MethodTable(())
    assert t.label_unknown("/a.S/M", answered=False) == OTHER  # no replica knows it
    assert t.label_unknown("/a.S/M", answered=True) == "/a.S/M"
    assert t.label_unknown("/a.S/M", answered=False) == "/a.S/M"  # once admitted, kept
    assert t.admitted("/a.S/M")
    for bad in ("/a.S/M\n", "/a S/M", "/a.S/M/x", "a.S/M", "/" + "x" * 300 + "/M", "/a.S/"):
        assert t.label_unknown(bad, answered=True) == OTHER
    assert [t.label_unknown(f"/a.S/N{i}", True) for i in range(3)] == ["/a.S/N0", "/a.S/N1",
                                                                        OTHER]
    assert t.label_unknown("/b.S/M", True) == "/b.S/M"
    assert t.label_unknown("/b.S/N", True) == "/b.S/N"
    assert t.label_unknown("/c.S/M", True) == OTHER  # the overall cap
    # A name learned later is a known method, not an admitted unknown one.
    assert len(t._unknown) == 5


# -- through the gateway ------------------------------------------------------------------


@pytest.mark.parametrize("source", ["proto_files", "descriptor_sets"])
async def test_learned_methods_get_their_shape_and_label(
        start_gateway: Any, tmp_path: Path, source: str) -> None:
    top: dict[str, Any] = (
        {"proto_files": ECHO_FILES} if source == "proto_files"
        else {"descriptor_sets": [str(write_descriptor_set(tmp_path / "echo.pb"))]})
    async with echo_replica() as port, start_gateway(echo_app(port), **top) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        assert await ch.unary_unary(SAY)(b"\n\x02hi", metadata=MD) == b"\n\x02hi"
        assert gw.proxy._handlers[SAY].request_streaming is False
        assert gw.proxy._handlers[SAY].response_streaming is False
        got = [m async for m in ch.unary_stream("/testecho.Echo/Listen")(b"x", metadata=MD)]
        assert got == [b"x"] * 3

        async def two() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        assert await ch.stream_unary("/testecho.Echo/Gather")(two(), metadata=MD) == b"ab"
        assert [m async for m in ch.stream_stream(CHAT)(two(), metadata=MD)] == [b"a", b"b"]
        s = await scrape_until(gw, lambda s: bool(s.where(
            "ray_serve_num_grpc_requests_total", method=SAY)))
        assert s.where("ray_serve_num_grpc_requests_total", method=SAY)
        assert not s.where("ray_serve_num_grpc_requests_total", method=OTHER)
        # Known from the config: no warning.
        dep = build_status(gw).applications["echo"].deployments["Echo"]
        assert dep.warning == ""


async def test_unknown_methods_warn_and_keep_bounded_names(
        start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with echo_replica() as port, start_gateway(echo_app(port)) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        # At start: the replicas serve no reflection and nothing else names their methods.
        status = build_status(gw)
        warning = status.applications["echo"].deployments["Echo"].warning
        assert "no gRPC reflection" in warning and "proto_files" in warning
        assert any("serve no gRPC reflection" in r.getMessage() for r in caplog.records)
        # Over the admin wire and in `gateway status` output.
        assert "proto_files" in from_proto(to_proto(status)).to_yaml()
        # Unknown shape, but the call works and keeps its name (the replica answered it).
        # A method the replica does not have: UNIMPLEMENTED, labelled other, not cached, and
        # no warning of its own (any client can send any path).
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/testecho.Echo/Nope")(b"hi", metadata=MD)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "/testecho.Echo/Nope" not in gw.proxy._handlers
        assert gw.proxy.routes["echo"].router.unknown_method == ""
        assert await ch.unary_unary(SAY)(b"hi", metadata=MD) == b"hi"
        assert SAY not in gw.proxy._handlers  # not cached before a replica answered it
        assert await ch.unary_unary(SAY)(b"hi", metadata=MD) == b"hi"
        assert gw.proxy._handlers[SAY].request_streaming is True  # the bidi handler, cached
        s = await scrape_until(gw, lambda s: bool(
            s.where("ray_serve_num_grpc_requests_total", method=SAY)
            and s.where("ray_serve_num_grpc_requests_total", method=OTHER)))
        assert s.where("ray_serve_num_grpc_requests_total", method=SAY)
        assert s.where("ray_serve_num_grpc_requests_total", method=OTHER)
        assert not s.where("ray_serve_num_grpc_requests_total", method="/testecho.Echo/Nope")
        warning = build_status(gw).applications["echo"].deployments["Echo"].warning
        assert "'/testecho.Echo/Say'" in warning and "descriptor_sets" in warning
        assert any("is not known to the gateway" in r.getMessage() for r in caplog.records)
        # Learning the methods later (a deploy naming the protos) reshapes the cached handler.
        cfg = gw.config.model_copy(update={"proto_files": type(gw.config.proto_files)(
            **ECHO_FILES)})
        await gw.apply(cfg)
        assert await ch.unary_unary(SAY)(b"hi", metadata=MD) == b"hi"
        assert gw.proxy._handlers[SAY].request_streaming is False
        assert build_status(gw).applications["echo"].deployments["Echo"].warning == ""


async def test_bad_proto_files_refuse_the_deploy(start_gateway: Any, tmp_path: Path) -> None:
    async with echo_replica() as port, start_gateway(echo_app(port)) as gw:
        before = gw.config
        bad = gw.config.model_copy(update={"descriptor_sets": [str(tmp_path / "nope.pb")]})
        with pytest.raises(DeployError, match=r"descriptor_sets\[0\].*nothing was changed") as e:
            await gw.apply(bad)
        assert "nope.pb" not in str(e.value)
        assert gw.config is before


def test_gateway_check_reports_bad_proto_files(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"proto_files: [{tmp_path / 'missing.proto'}]\napplications: []\n")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "proto_files.files[0] is not a file" in done.stderr


def test_method_source_errors_quote_no_config_value(tmp_path: Path) -> None:
    from gateway.dataplane.method_sources import load_method_sources

    secret = tmp_path / "s3cr3t-token"
    secret.mkdir()
    bad = secret / "bad.proto"
    bad.write_text('syntax = "proto3";\nmessage {')
    for args in (([str(bad)], [str(secret)], []), ([str(bad)], [], []),
                 ([], [], [str(secret / "x.pb")])):
        with pytest.raises(MethodSourceError) as e:
            load_method_sources(*args)
        assert "s3cr3t" not in str(e.value), str(e.value)


def test_generated_request_ids_are_unique_v4_uuids() -> None:
    import uuid

    from gateway.dataplane.call import new_request_id

    ids = {new_request_id() for _ in range(20000)}
    assert len(ids) == 20000
    for rid in list(ids)[:100]:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 4 and u.variant == uuid.RFC_4122
