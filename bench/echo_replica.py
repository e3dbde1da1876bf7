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


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    bench_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
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
