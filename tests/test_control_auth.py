"""The replica control channel answers only the gateway that started the replica: anyone else
on the machine gets UNAUTHENTICATED for Reconfigure, CollectMetrics and the mux stream, while
the model's own service stays open (a benchmark calls it directly)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import psutil
import pytest

from gateway.control.auth import ENV_CONTROL_SECRET, METADATA_KEY, ControlChannel
from gateway.dataplane.mux import MUX_METHOD
from gateway.pb import replica_control_pb2, replica_control_pb2_grpc, text_model_pb2
from tests.conftest import TEXT_APP, gateway_config, md, running_gateway, text_stub


async def test_control_calls_without_the_secret_are_refused(tmp_path: Path) -> None:
    async with running_gateway(gateway_config([TEXT_APP], tmp_path), tmp_path) as gw:
        slot = gw.controller.apps["text"].ingress.slots[0]
        assert slot.replica is not None and slot.pid is not None
        address = slot.replica.address
        async with grpc.aio.insecure_channel(address) as ch:
            control = replica_control_pb2_grpc.ReplicaControlStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await control.Reconfigure(replica_control_pb2.ReconfigureRequest(
                    user_config_json=json.dumps({"prefix": "PWNED-"})), timeout=5)
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await control.Reconfigure(
                    replica_control_pb2.ReconfigureRequest(user_config_json="{}"),
                    metadata=((METADATA_KEY, "guessed"),), timeout=5)
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await control.CollectMetrics(replica_control_pb2.CollectMetricsRequest(),
                                             timeout=5)
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
            mux = ch.stream_stream(MUX_METHOD)()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                # Read only: a write racing the refusal can come back as grpc.aio's own
                # INTERNAL "Internal error from Core" instead of the server's status.
                await mux.read()
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
            # The model's own service: open, as before.
            reply = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                                timeout=5)
            assert reply.label == "positive"
        # The gateway's own calls (mux, reconfigure) still work, with the secret.
        async with grpc.aio.insecure_channel(gw.address) as ch:
            reply = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                                metadata=md("text"), timeout=5)
            assert reply.label == "positive"
        new = [{**TEXT_APP, "deployments": [
            {**TEXT_APP["deployments"][0], "user_config": {"prefix": "v2-"}}]}]
        assert await gw.apply(gateway_config(new, tmp_path)) == []
        async with grpc.aio.insecure_channel(gw.address) as ch:
            reply = await text_stub(ch).Predict(text_model_pb2.PredictRequest(text="good"),
                                                metadata=md("text"), timeout=5)
            assert reply.label == "v2-positive"
        # Handed over on stdin: never on the command line that `ps` shows, nor in the
        # environment that /proc/<pid>/environ keeps for the process's whole life.
        proc = psutil.Process(slot.pid)
        cmdline = " ".join(proc.cmdline())
        assert ENV_CONTROL_SECRET not in cmdline and "secret" not in cmdline.lower()
        assert isinstance(slot.replica.channel, ControlChannel)
        secret = slot.replica.channel._md[0][1]
        assert secret and secret not in cmdline
        environ = proc.environ()
        assert ENV_CONTROL_SECRET not in environ and secret not in "\0".join(environ.values())
