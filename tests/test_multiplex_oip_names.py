"""OIP model_name as the model id: the last one when repeated (as protobuf reads it), and a
name gRPC metadata cannot carry is refused clearly on both transports."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from examples.client import iris_input
from gateway.dataplane.errors import GatewayError
from gateway.dataplane.oip_model_id import MODEL_INFER, model_id_from_oip, oip_model_name
from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.pb import grpc_predict_v2_pb2_grpc as oip_grpc
from tests.test_multiplex_oip import OIP_APP


def test_repeated_model_name_takes_the_last_as_protobuf_does() -> None:
    two = (oip.ModelInferRequest(model_name="first").SerializeToString()
           + oip.ModelInferRequest(model_name="second").SerializeToString())
    assert oip.ModelInferRequest.FromString(two).model_name == "second"
    assert oip_model_name(two) == "second"


def test_non_ascii_model_name_is_refused_with_a_clear_status() -> None:
    req = oip.ModelInferRequest(model_name="tenant-\u00e9").SerializeToString()
    with pytest.raises(GatewayError) as e:
        model_id_from_oip(MODEL_INFER, req)
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "ASCII" in e.value.details


@pytest.mark.parametrize("transport", ["mux", "grpc"])
async def test_non_ascii_name_end_to_end(start_gateway: Any, transport: str) -> None:
    async with start_gateway([OIP_APP], proxy={"local_transport": transport}) as gw, \
            grpc.aio.insecure_channel(gw.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        req = iris_input()
        req.model_name = "\u65e5\u672c"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(req, metadata=(("application", "oip"),), timeout=20)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "printable ASCII" in (e.value.details() or "")
        req.model_name = "t1"  # the gateway still serves the next call
        await stub.ModelInfer(req, metadata=(("application", "oip"),), timeout=20)
