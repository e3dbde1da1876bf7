"""A multiplexed loader defined in another module than the servicer still makes the deployment
multiplexed: its replicas declare their capacity and the gateway routes by model id."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.runtime import multiplex
from tests.conftest import PredictRequest, text_stub


def test_capacity_of_a_loader_imported_from_another_module() -> None:
    from examples.models import TextModel
    from tests.mux_split.service import ByModule, SplitText

    assert multiplex.declared_capacity(SplitText) == 2
    assert multiplex.declared_capacity(ByModule) == 2
    assert multiplex.declared_capacity(TextModel) is None


async def test_split_loader_end_to_end(start_gateway: Any) -> None:
    app = {"name": "mx", "deployments": [{"name": "SplitText",
           "import_path": "tests.mux_split.service:SplitText", "num_replicas": 2}]}
    async with start_gateway([app]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        md = (("application", "mx"), ("multiplexed_model_id", "t1"))
        r = await stub.Predict(PredictRequest(text="x"), metadata=md, timeout=20)
        assert r.label == "model:t1"
        assert [s.replica.mux_capacity for _, s in gw.controller.slots()] == [2, 2]
        assert gw.controller.apps["mx"].ingress.router.affinity is not None
