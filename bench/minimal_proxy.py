"""The Python floor: a `grpc.aio` pass-through proxy that forwards unary calls' bytes.

A generic handler, one upstream channel, request and response bytes and the caller's metadata
passed through, the upstream status passed back; nothing else (no routing, no telemetry). Bench
code, not product code: `python -m bench.minimal_proxy --target HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

import grpc

# Hop-by-hop or transport-owned keys that grpc sets itself on the upstream call.
_DROP = frozenset({"user-agent", "grpc-timeout", "te", "content-type", "grpc-accept-encoding",
                   "grpc-encoding"})


def _identity(b: bytes) -> bytes:
    return b


class PassThrough(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        h = self._handlers.get(method)
        if h is None:
            upstream = self._channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity)

            async def forward(
                request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
            ) -> bytes:
                md = tuple((k, v) for k, v in context.invocation_metadata() or ()
                           if k not in _DROP)
                call = upstream(request, metadata=md, timeout=context.time_remaining())
                try:
                    return await call  # type: ignore[no-any-return]
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), e.details() or "")
                    raise

            h = grpc.unary_unary_rpc_method_handler(
                forward, request_deserializer=_identity, response_serializer=_identity)
            self._handlers[method] = h
        return h


async def serve(host: str, port: int, target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((PassThrough(channel),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    await channel.close(None)


def main() -> None:
    p = argparse.ArgumentParser(description="minimal grpc.aio pass-through proxy (bench only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--target", required=True)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the event loop (asyncio: the floor the targets compare against)")
    a = p.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if a.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(a.host, a.port, a.target))


if __name__ == "__main__":
    main()
