"""The trivial replica of the benchmark: `Echo` returns its request and only counts it.

Used both ways: the gateway imports `bench.echo_replica:Echo` for a local replica, and
`python -m bench.echo_replica --port N` runs it as a plain `grpc.aio` server (the external
replica, reached through `targets`), with health and reflection like a real model server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import gateway
from gateway.pb import bench_pb2, bench_pb2_grpc

ECHO_METHOD = "/bench.Echo/Echo"
STATS_METHOD = "/bench.Echo/Stats"
UNLISTED_SERVICE = "bench.Unlisted"
UNLISTED_ECHO_METHOD = f"/{UNLISTED_SERVICE}/Echo"
UNLISTED_STATS_METHOD = f"/{UNLISTED_SERVICE}/Stats"


class Echo(bench_pb2_grpc.EchoServicer):
    """Negligible work per call, so the benchmark measures the path, not the model."""

    def __init__(self) -> None:
        self.calls = 0

    async def Echo(self, request: bench_pb2.EchoMessage, context: Any) -> bench_pb2.EchoMessage:
        self.calls += 1
        return request

    async def Stats(self, request: bench_pb2.StatsRequest, context: Any) -> bench_pb2.StatsReply:
        return bench_pb2.StatsReply(calls=self.calls, pid=os.getpid())


class MuxEcho(Echo):
    """Echo with model multiplexing on: each call gets its (already loaded) model first."""

    @gateway.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        return model_id

    async def Echo(self, request: bench_pb2.EchoMessage, context: Any) -> bench_pb2.EchoMessage:
        await self.get_model(gateway.get_multiplexed_model_id())
        self.calls += 1
        return request


def add_unlisted(servicer: Echo, server: grpc.aio.Server) -> None:
    """`servicer`'s Echo and Stats as `bench.Unlisted`, registered the way the generated
    `add_EchoServicer_to_server` registers `bench.Echo` (same (de)serializers, same
    registered-method lookup): identical work per call. Nothing describes it to reflection.
    Give it its own `Echo` instance: its Stats then counts only the calls to this name."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            servicer.Echo, request_deserializer=bench_pb2.EchoMessage.FromString,
            response_serializer=bench_pb2.EchoMessage.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=bench_pb2.StatsRequest.FromString,
            response_serializer=bench_pb2.StatsReply.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(UNLISTED_SERVICE, handlers),))
    server.add_registered_method_handlers(UNLISTED_SERVICE, handlers)  # type: ignore[attr-defined]


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    bench_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    add_unlisted(Echo(), server)
    hs = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection(
        (bench_pb2.DESCRIPTOR.services_by_name["Echo"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"listening {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description="trivial echo replica for the benchmark")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    asyncio.run(serve(a.host, a.port))


if __name__ == "__main__":
    main()
