"""`multiplexed_model_id_from: oip_model_name`: the OIP request's model_name is the model id."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from examples.client import iris_input
from gateway.dataplane.oip_model_id import MODEL_INFER, model_id_from_oip, oip_model_name
from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.pb import grpc_predict_v2_pb2_grpc as oip_grpc

OIP_APP = {"name": "oip", "multiplexed_model_id_from": "oip_model_name", "deployments": [{
    "name": "OipTenants", "import_path": "tests.multiplex_models:OipTenants",
    "num_replicas": 2}]}


def test_reads_only_model_name_from_the_bytes() -> None:
    req = iris_input()
    req.model_name = "tenant-x"
    req.id = "abc"
    req.parameters["p"].string_param = "v"
    assert oip_model_name(req.SerializeToString()) == "tenant-x"
    # model_name after the tensors (fields in any order): still found, tensors skipped whole.
    tail = oip.ModelInferRequest(inputs=req.inputs).SerializeToString() + \
        oip.ModelInferRequest(model_name="late").SerializeToString()
    assert oip_model_name(tail) == "late"
    assert oip_model_name(oip.ModelInferRequest(id="x").SerializeToString()) is None
    assert model_id_from_oip("/other/Method", req.SerializeToString()) is None
    assert model_id_from_oip(MODEL_INFER, req.SerializeToString()) == "tenant-x"


@pytest.mark.parametrize("junk", [b"", b"\x0a", b"\x0a\x05ab", b"\xff" * 20, b"\x0a\x02\xff\xfe",
                                  b"\x0b\x00", b"\x0a" + b"\x80" * 12, b"\x0a\x00"])
def test_junk_bytes_give_no_id(junk: bytes) -> None:
    assert oip_model_name(junk) is None


async def test_unmodified_oip_clients_get_per_model_routing(start_gateway: Any) -> None:
    async with start_gateway([OIP_APP]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        where: dict[str, set[str]] = {}
        scores: dict[str, list[float]] = {}
        for n in range(12):
            tenant = f"t{n % 3}"
            req = iris_input()
            req.model_name = tenant
            call = stub.ModelInfer(req, metadata=(("application", "oip"),), timeout=20)
            resp = await call
            trailers = dict(await call.trailing_metadata())
            assert trailers["x-model-id"] == tenant
            where.setdefault(tenant, set()).add(trailers["x-replica"])
            got = list(resp.outputs[1].contents.fp32_contents)
            assert scores.setdefault(tenant, got) == got
        assert all(len(r) == 1 for r in where.values()), where  # each stays where it loaded
        # The metadata key wins over the model name when both are sent.
        req = iris_input()
        req.model_name = "t0"
        with pytest.raises(grpc.aio.AioRpcError) as e:  # OipTenants asserts they agree
            await stub.ModelInfer(req, timeout=20, metadata=(
                ("application", "oip"), ("multiplexed_model_id", "other")))
        assert e.value.code() is grpc.StatusCode.UNKNOWN
