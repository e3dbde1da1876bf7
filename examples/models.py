"""Demo models served by the gateway's local replicas.

- `Iris`: an Open Inference Protocol (KServe v2) model named `iris`: input `features` FP32
  [N, 4]; outputs `label` BYTES [N] and `score` FP32 [N]. Fixed weights, no files to load.
- `TenantIris`: the same `iris` model multiplexed per tenant (`multiplexed_model_id`
  metadata): each id gets its own weights, at most 2 models per replica (LRU).
- `TextModel`: the example service with all four RPC shapes, plus test hooks (sleep, fail
  with a status code, report what metadata and deadline it saw, count cancellations).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc

import gateway
from gateway.oip import Tensor, infer_response
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.pb import text_model_pb2, text_model_pb2_grpc

CLASSES = ("setosa", "versicolor", "virginica")
# One weight row per class over (sepal length, sepal width, petal length, petal width).
WEIGHTS = (
    (0.42, 0.97, -2.46, -1.07),
    (0.53, -0.32, -0.20, -0.94),
    (-0.95, -0.65, 2.66, 2.01),
)
BIAS = (0.26, 0.6, -1.36)


def classify(
    row: tuple[float, ...],
    weights: tuple[tuple[float, ...], ...] = WEIGHTS,
    bias: tuple[float, ...] = BIAS,
) -> tuple[str, float]:
    logits = [
        sum(w * x for w, x in zip(ws, row, strict=True)) + b
        for ws, b in zip(weights, bias, strict=True)
    ]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    probs = [e / sum(exps) for e in exps]
    best = max(range(len(CLASSES)), key=probs.__getitem__)
    return CLASSES[best], probs[best]


def _replica_name() -> str:
    return os.environ.get("GATEWAY_REPLICA_ID", f"pid-{os.getpid()}")


class Iris(pb_grpc.GRPCInferenceServiceServicer):
    """The `iris` classifier over the Open Inference Protocol."""

    name = "iris"
    version = "1"

    def __init__(self) -> None:
        self.threshold = 0.0

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        self.threshold = float((user_config or {}).get("threshold", 0.0))

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="grpc-gateway-demo", version="0.1.0")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        if request.name != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=[self.version],
            platform="python",
            inputs=[t(name="features", datatype="FP32", shape=[-1, 4])],
            outputs=[
                t(name="label", datatype="BYTES", shape=[-1]),
                t(name="score", datatype="FP32", shape=[-1]),
            ],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        if request.model_name and request.model_name != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        rows = await self._rows(request, context)
        weights, bias = await self._weights(context)
        labels, scores = [], []
        for row in rows:
            label, score = classify(row, weights, bias)
            if score < self.threshold:
                label = "uncertain"
            labels.append(label.encode())
            scores.append(score)
        n = len(rows)
        # In the request's form: raw outputs for raw inputs (what Triton's clients read).
        return infer_response(
            request,
            [Tensor("label", "BYTES", [n], labels), Tensor("score", "FP32", [n], scores)],
            model_name=self.name,
            model_version=self.version,
        )

    async def _weights(self, context: Any) -> tuple[Any, Any]:
        return WEIGHTS, BIAS

    async def _rows(self, request: pb.ModelInferRequest, context: Any) -> list[tuple[float, ...]]:
        async def bad(why: str) -> Any:
            context.set_trailing_metadata((("x-model-error", "bad-input"),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)

        tensor = next((t for i, t in enumerate(request.inputs) if t.name == "features"), None)
        if tensor is None:
            return await bad("input 'features' is missing")  # type: ignore[no-any-return]
        if tensor.datatype != "FP32" or len(tensor.shape) != 2 or tensor.shape[1] != 4:
            return await bad(  # type: ignore[no-any-return]
                f"input 'features' must be FP32 [N, 4], got {tensor.datatype} {list(tensor.shape)}"
            )
        n = tensor.shape[0]
        index = list(request.inputs).index(tensor)
        if request.raw_input_contents:
            raw = request.raw_input_contents[index]
            if len(raw) != n * 16:
                return await bad(f"raw contents of 'features' hold {len(raw)} bytes, want {n * 16}")  # type: ignore[no-any-return]
            flat = struct.unpack(f"<{n * 4}f", raw)
        else:
            flat = tuple(tensor.contents.fp32_contents)
            if len(flat) != n * 4:
                return await bad(f"'features' holds {len(flat)} values, want {n * 4}")  # type: ignore[no-any-return]
        return [flat[i * 4 : (i + 1) * 4] for i in range(n)]


class TenantModel:
    """One tenant's iris weights: the shared ones, shifted by an amount derived from its id."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        digest = hashlib.sha256(model_id.encode()).digest()
        shift = [(b - 128) / 256 for b in digest[:12]]
        self.weights = tuple(
            tuple(w + shift[i * 4 + j] for j, w in enumerate(ws)) for i, ws in enumerate(WEIGHTS)
        )
        self.bias = BIAS
        self.closed = False

    def close(self) -> None:
        """Run by the gateway runtime when the model is evicted (least recently used)."""
        self.closed = True


class TenantIris(Iris):
    """`iris` per tenant: the call's `multiplexed_model_id` picks the weights."""

    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> TenantModel:
        await asyncio.sleep(0.05)  # as if fetched from a model store
        return TenantModel(model_id)

    async def _weights(self, context: Any) -> tuple[Any, Any]:
        model = await self.get_model(gateway.get_multiplexed_model_id())
        context.set_trailing_metadata((("x-model-id", model.model_id),
                                       ("x-replica", _replica_name())))
        return model.weights, model.bias


class TextModel(text_model_pb2_grpc.TextModelServicer):
    """A toy sentiment model with all four RPC shapes and hooks for tests."""

    cancelled = 0

    def __init__(self) -> None:
        self.prefix = ""

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        self.prefix = str((user_config or {}).get("prefix", ""))

    def _answer(
        self, req: text_model_pb2.PredictRequest, context: Any, index: int = 0
    ) -> text_model_pb2.PredictResponse:
        text = req.text.lower()
        positive = sum(text.count(w) for w in ("good", "great", "love"))
        negative = sum(text.count(w) for w in ("bad", "awful", "hate"))
        label = (
            "positive" if positive > negative else "negative" if negative > positive else "neutral"
        )
        score = 0.5 + 0.5 * math.tanh(positive - negative)
        seen = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        seen["cancelled_seen"] = str(TextModel.cancelled)
        remaining = context.time_remaining()
        return text_model_pb2.PredictResponse(
            label=self.prefix + label,
            score=score,
            replica=_replica_name(),
            seen_metadata=seen,
            deadline_remaining_s=remaining if remaining is not None and remaining < 1e8 else -1.0,
            index=index,
        )

    async def _hooks(self, req: text_model_pb2.PredictRequest, context: Any) -> None:
        if req.sleep_s > 0:
            try:
                await asyncio.sleep(req.sleep_s)
            except asyncio.CancelledError:
                TextModel.cancelled += 1
                raise
        if req.fail_code:
            code = next(c for c in grpc.StatusCode if c.value[0] == req.fail_code)
            context.set_trailing_metadata((("x-fail-reason", "requested"),))
            await context.abort(code, f"failing as asked: {code.name}")

    async def Predict(
        self, request: text_model_pb2.PredictRequest, context: Any
    ) -> text_model_pb2.PredictResponse:
        await self._hooks(request, context)
        return self._answer(request, context)

    async def PredictStream(
        self, request: text_model_pb2.PredictRequest, context: Any
    ) -> AsyncIterator[text_model_pb2.PredictResponse]:
        for i in range(max(request.repeat, 1)):
            if i == 1:
                await self._hooks(request, context)
            yield self._answer(request, context, i)

    async def PredictBatch(
        self, request_iterator: AsyncIterator[text_model_pb2.PredictRequest], context: Any
    ) -> text_model_pb2.PredictResponse:
        texts = []
        async for req in request_iterator:
            await self._hooks(req, context)
            texts.append(req.text)
        resp = self._answer(text_model_pb2.PredictRequest(text=" ".join(texts)), context)
        resp.index = len(texts)
        return resp

    async def Chat(
        self, request_iterator: AsyncIterator[text_model_pb2.PredictRequest], context: Any
    ) -> AsyncIterator[text_model_pb2.PredictResponse]:
        i = 0
        async for req in request_iterator:
            await self._hooks(req, context)
            yield self._answer(req, context, i)
            i += 1


class Broken(text_model_pb2_grpc.TextModelServicer):
    """A model whose constructor fails, to show how the gateway reports it."""

    def __init__(self) -> None:
        raise RuntimeError("model weights not found at /models/broken.bin")
