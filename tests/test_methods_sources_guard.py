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
from gateway.dataplane.method_sources import (
    MethodSourceError,
    load_descriptor_set,
    load_method_sources,
)
from gateway.dataplane.methods import MethodTable
from tests.test_methods_sources import SAY, echo_app, echo_replica, write_descriptor_set


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


# -- the gateway's own methods win; a deploy forgets removed sources ----------------------

BIDI_INFER = '''syntax = "proto3";
package inference;
message ModelInferRequest { string model_name = 1; }
message ModelInferResponse { string model_name = 1; }
service GRPCInferenceService {
  rpc ModelInfer(stream ModelInferRequest) returns (stream ModelInferResponse);
}
'''
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _descriptor_set(tmp_path: Path, name: str, text: str) -> Path:
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / (name + ".pb")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}",
                    f"--descriptor_set_out={out}", "--include_imports", str(src)], check=True)
    return out


def test_a_source_cannot_redefine_a_builtin_method(tmp_path: Path) -> None:
    bad = _descriptor_set(tmp_path, "oip_bidi.proto", BIDI_INFER)
    with pytest.raises(MethodSourceError, match="redefines the gateway's own method") as e:
        load_method_sources([], [], [str(bad)])
    assert INFER in str(e.value) and str(tmp_path) not in str(e.value)
    # The real OIP proto, repeated in a set (protoc --include_imports does that), is fine.
    oip = Path(__file__).parents[1] / "protos"
    same = tmp_path / "oip.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-Igateway/pb={oip}",
                    f"--descriptor_set_out={same}", "--include_imports",
                    str(oip / "grpc_predict_v2.proto")], check=True)
    assert load_method_sources([], [], [str(same)])
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"descriptor_sets: [{bad}]\napplications: []\n")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "redefines the gateway's own method" in done.stderr


def test_reflection_cannot_redefine_a_builtin_method(tmp_path: Path) -> None:
    bad = _descriptor_set(tmp_path, "oip_bidi.proto", BIDI_INFER)
    files = method_sources._pool_files(_fds(bad), "x")  # as reflection would hand them
    table = MethodTable()
    before = table.get(INFER)
    assert before is not None and not before.client_streaming
    assert table.add_file(files[0]) == [INFER]
    assert table.get(INFER) == before
    table.rebuild([], files)
    assert table.get(INFER) == before


def _fds(path: Path) -> Any:
    from google.protobuf import descriptor_pb2

    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


async def test_a_deploy_forgets_removed_sources(start_gateway: Any, tmp_path: Path) -> None:
    echo = write_descriptor_set(tmp_path / "echo.pb")
    async with echo_replica() as port, \
            start_gateway(echo_app(port), descriptor_sets=[str(echo)]) as gw:
        assert gw.methods.get(SAY) is not None
        await gw.apply(gw.config.model_copy(update={"descriptor_sets": []}))
        assert gw.methods.get(SAY) is None
        assert gw.methods.get(INFER) is not None  # built-ins stay
        await gw.apply(gw.config.model_copy(update={"descriptor_sets": [str(echo)]}))
        assert gw.methods.get(SAY) is not None


# -- the records decoder follows the current definitions --------------------------------

V1 = 'syntax = "proto3";\npackage rectest;\nmessage M { string a = 1; }\n'
V2 = 'syntax = "proto3";\npackage rectest;\nmessage M { int64 b = 1; }\n'


async def test_decoder_uses_the_current_definitions_and_stays_bounded(
        start_gateway: Any, tmp_path: Path) -> None:
    v1 = _descriptor_set(tmp_path, "v1.proto", V1)
    (tmp_path / "v2").mkdir()
    v2 = _descriptor_set(tmp_path / "v2", "v1.proto", V2)
    async with echo_replica() as port, \
            start_gateway(echo_app(port), descriptor_sets=[str(v1)]) as gw:
        decoder = gw.records.decoder
        assert "a" in decoder.message_class("rectest.M").DESCRIPTOR.fields_by_name
        await gw.apply(gw.config.model_copy(update={"descriptor_sets": [str(v2)]}))
        assert "b" in decoder.message_class("rectest.M").DESCRIPTOR.fields_by_name
        for _ in range(5):
            await gw.apply(gw.config.model_copy(update={"descriptor_sets": [str(v1)]}))
        assert len(decoder.pools) == 2
        assert "a" in decoder.message_class("rectest.M").DESCRIPTOR.fields_by_name
        await gw.apply(gw.config.model_copy(update={"descriptor_sets": []}))
        assert len(decoder.pools) == 1


# -- proto_files error messages -------------------------------------------------------------


def test_protoc_errors_name_keys_and_keep_the_real_error(tmp_path: Path) -> None:
    d = tmp_path / "tenant-s3cret"
    d.mkdir()
    (d / "x.proto").write_text('syntax="proto3"; import "y.proto"; package x;\n')
    (d / "y.proto").write_text('syntax="proto3"; package y; message M { nope a = 1; }\n')
    no_syntax = d / "plain.proto"
    no_syntax.write_text("this is not a proto file\n")
    with pytest.raises(MethodSourceError) as e:
        load_method_sources([str(d / "x.proto")], [], [])
    msg = str(e.value)
    assert "s3cret" not in msg and '"nope" is not defined' in msg, msg
    assert "<directory of proto_files.files[0]>/y.proto" in msg
    with pytest.raises(MethodSourceError) as e:
        load_method_sources([str(d / ".." / d.name / "plain.proto")], [], [])
    msg = str(e.value)
    assert "absl" not in msg and "W0000" not in msg and "WARNING" not in msg, msg
    assert "Expected top-level statement" in msg and "s3cret" not in msg, msg
