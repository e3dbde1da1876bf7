"""Call the demo through the gateway: `python -m examples.client [--address 127.0.0.1:9000]`."""

from __future__ import annotations

import argparse
import asyncio
import uuid

import grpc

from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.pb import grpc_predict_v2_pb2_grpc as oip_grpc
from gateway.pb import text_model_pb2, text_model_pb2_grpc

TENANTS = ("tenant-a", "tenant-b", "tenant-c", "tenant-d", "tenant-e")


def iris_input() -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="features",
        datatype="FP32",
        shape=[2, 4],
        contents=oip.InferTensorContents(fp32_contents=[5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]),
    )
    return oip.ModelInferRequest(model_name="iris", inputs=[tensor])


async def tenants(channel: grpc.aio.Channel) -> dict[str, list[float]]:
    """Application `tenants`: the same input for a few model ids, each its own weights."""
    infer = oip_grpc.GRPCInferenceServiceStub(channel)
    scores: dict[str, list[float]] = {}
    for model_id in TENANTS:
        call = infer.ModelInfer(
            iris_input(),
            metadata=(("application", "tenants"), ("multiplexed_model_id", model_id)),
        )
        response = await call
        trailers = dict(await call.trailing_metadata())
        scores[model_id] = [round(s, 3) for s in response.outputs[1].contents.fp32_contents]
        print(f"tenants {model_id}: scores={scores[model_id]} (replica {trailers['x-replica']})")
    return scores


async def main(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        # Open Inference Protocol: the `iris` model of application `classifier`.
        infer = oip_grpc.GRPCInferenceServiceStub(channel)
        request_id = str(uuid.uuid4())
        call = infer.ModelInfer(
            iris_input(),
            metadata=(("application", "classifier"), ("x-request-id", request_id)),
        )
        response = await call
        labels = [b.decode() for b in response.outputs[0].contents.bytes_contents]
        scores = [round(s, 3) for s in response.outputs[1].contents.fp32_contents]
        trailers = dict(await call.trailing_metadata())
        print(f"iris: labels={labels} scores={scores} request_id={trailers['x-request-id']}")

        # The example service, all four RPC shapes, application `text`.
        stub = text_model_pb2_grpc.TextModelStub(channel)
        md = (("application", "text"),)
        r = await stub.Predict(text_model_pb2.PredictRequest(text="I love it"), metadata=md)
        print(f"text unary: {r.label} {r.score:.2f} (replica {r.replica})")
        stream = stub.PredictStream(
            text_model_pb2.PredictRequest(text="good", repeat=3), metadata=md
        )
        print("text server streaming:", [m.index async for m in stream])

        async def texts():  # type: ignore[no-untyped-def]
            for t in ("good", "bad", "great"):
                yield text_model_pb2.PredictRequest(text=t)

        r = await stub.PredictBatch(texts(), metadata=md)
        print(f"text client streaming: {r.index} messages -> {r.label}")
        print("text bidi:", [m.label async for m in stub.Chat(texts(), metadata=md)])

        # Model multiplexing: application `tenants`, one model per `multiplexed_model_id`.
        await tenants(channel)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:9000")
    asyncio.run(main(parser.parse_args().address))
