"""Multiplexed test models: the text service, one "model" per `multiplexed_model_id`.

The number of model slots comes from MUX_TEST_SLOTS (read when a replica imports this module),
so a test picks it through the environment its gateway passes to the replicas.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import gateway
from examples.models import TenantIris, TextModel
from gateway.pb import text_model_pb2

SLOTS = int(os.environ.get("MUX_TEST_SLOTS", "4"))


class Model:
    def __init__(self, model_id: str, closed: list[str]) -> None:
        self.model_id = model_id
        self._closed = closed

    def close(self) -> None:
        self._closed.append(self.model_id)


class MuxText(TextModel):
    """`Predict` answers with the model id as its label and, in `seen_metadata`, the replica's
    loads and closes so far. Ids starting with `fail` fail to load; `slow` ones load in 0.5 s."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: Counter[str] = Counter()
        self.closed: list[str] = []

    @gateway.multiplexed(max_num_models_per_replica=SLOTS)
    async def get_model(self, model_id: str) -> Model:
        self.loads[model_id] += 1
        await asyncio.sleep(0.5 if model_id.startswith("slow") else 0.02)
        if model_id.startswith("fail"):
            raise ValueError(f"no weights for {model_id}")
        return Model(model_id, self.closed)

    async def Predict(
        self, request: text_model_pb2.PredictRequest, context: Any
    ) -> text_model_pb2.PredictResponse:
        model = await self.get_model(gateway.get_multiplexed_model_id())
        resp = self._answer(request, context)
        resp.label = model.model_id
        resp.seen_metadata["loads"] = ",".join(f"{k}={v}" for k, v in sorted(self.loads.items()))
        resp.seen_metadata["closed"] = ",".join(self.closed)
        return resp

    async def PredictStream(self, request: text_model_pb2.PredictRequest,
                            context: Any) -> Any:
        # Over plain gRPC (not the mux): the id reaches the handler there too.
        model = await self.get_model(gateway.get_multiplexed_model_id())
        for i in range(max(request.repeat, 1)):
            resp = self._answer(request, context, i)
            resp.label = model.model_id
            yield resp


class OipTenants(TenantIris):
    """TenantIris whose clients name the tenant as the OIP `model_name` (Triton style)."""

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        assert request.model_name == gateway.get_multiplexed_model_id()
        request.model_name = ""  # the model name is the tenant here, not `iris`
        return await super().ModelInfer(request, context)
