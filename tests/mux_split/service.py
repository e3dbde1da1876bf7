"""Servicers calling loaders of tests/mux_split/loaders.py: imported by name and as a module."""

from __future__ import annotations

from typing import Any

import gateway
from examples.models import TextModel
from tests.mux_split import loaders
from tests.mux_split.loaders import load_model


class SplitText(TextModel):
    async def Predict(self, request: Any, context: Any) -> Any:
        resp = self._answer(request, context)
        resp.label = await load_model(gateway.get_multiplexed_model_id())
        return resp


class ByModule(TextModel):
    async def Predict(self, request: Any, context: Any) -> Any:
        resp = self._answer(request, context)
        resp.label = await loaders.load_model(gateway.get_multiplexed_model_id())
        return resp
