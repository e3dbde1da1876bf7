"""Call the demo through the gateway: `python -m examples.client [--address 127.0.0.1:9000]`."""

from __future__ import annotations

import argparse
import asyncio
import uuid

import grpc

from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.pb import grpc_predict_v2_pb2_grpc as oip_grpc
from gateway.pb import text_model_pb2, text_model_pb2_grpc


async def main(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        # Open Inference Protocol: the `iris` model of application `classifier`.
        infer = oip_grpc.GRPCInferenceServiceStub(channel)
        request_id = str(uuid.uuid4())
        tensor = oip.ModelInferRequest.InferInputTensor(
            name="features",
            datatype="FP32",
            shape=[2, 4],
            contents=oip.InferTensorContents(
                fp32_contents=[5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
            ),
        )
        call = infer.ModelInfer(
            oip.ModelInferRequest(model_name="iris", inputs=[tensor]),
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:9000")
    asyncio.run(main(parser.parse_args().address))
