"""External replicas' client TLS files are re-read: in place rotation (on the health-check
period) and SIGHUP (`reload_all`)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc

from gateway.pb import text_model_pb2, text_model_pb2_grpc
from gateway.tls import reload_all
from tests.conftest import external_replica, gateway_config, md, running_gateway
from tests.tls_support import CA, Pair, overwrite, read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _creds(pair: Pair) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(read(pair.key_file), read(pair.cert_file))])


async def _call(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            await text_model_pb2_grpc.TextModelStub(ch).Predict(
                text_model_pb2.PredictRequest(text="x"), metadata=md("text"), timeout=3)
            return "OK"
        except grpc.aio.AioRpcError as e:
            return e.code().name


async def _call_until_ok(address: str, seconds: float = 10.0) -> str:
    got = ""
    for _ in range(int(seconds / 0.25)):
        got = await _call(address)
        if got == "OK":
            break
        await asyncio.sleep(0.25)
    return got


async def test_ca_rotated_in_place_is_used(tmp_path: Path) -> None:
    old, new = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    trust = tmp_path / "replica-ca.pem"
    trust.write_bytes(old.pem)
    r_old = old.issue("r", names=("replica.internal",))
    r_new = new.issue("r2", names=("replica.internal",))
    port = _free_port()
    dep = {"name": "Ext", "targets": [f"127.0.0.1:{port}"], "health_check_period_s": 0.3,
           "tls": {"ca_file": str(trust), "server_name": "replica.internal"}}
    cfg = gateway_config([{"name": "text", "deployments": [dep]}], tmp_path)
    async with running_gateway(cfg, tmp_path) as gw:
        async with external_replica(tls=_creds(r_old), port=port):
            assert await _call_until_ok(gw.address) == "OK"
        overwrite(str(trust), new.pem)  # the operator rotates the CA bundle in place
        async with external_replica(tls=_creds(r_new), port=port):
            assert await _call_until_ok(gw.address) == "OK"
            # SIGHUP: a new channel even when the files did not change.
            slot = gw.controller.apps["text"].ingress.slots[0]
            before = slot.replica
            reload_all()
            for _ in range(40):
                if slot.replica is not before:
                    break
                await asyncio.sleep(0.1)
            assert slot.replica is not before
            assert await _call_until_ok(gw.address) == "OK"
