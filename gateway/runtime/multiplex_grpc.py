"""Model ids and load failures of plain gRPC calls to a replica (streaming methods, or
`local_transport: grpc`); mux calls get the same from gateway/runtime/mux_server.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

from gateway.runtime import models_trailer
from gateway.runtime.multiplex import MultiplexedModelError, _model_id, model_id_of


def _report(context: Any) -> tuple[tuple[str, str], ...]:
    """The handler's own trailers plus this replica's models (models_trailer.py): the gateway
    routes by them, as it does by the reports of mux calls."""
    try:
        own = tuple(context.trailing_metadata() or ())
    except Exception:  # a context without it (older grpc): ours only
        own = ()
    return (*own, (models_trailer.MODELS_KEY, models_trailer.current()))


class MultiplexInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Sets the call's model id for its handler, and answers a `MultiplexedModelError` with its
    status. Mux calls get the same from the mux server (gateway/runtime/mux_server.py)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(  # type: ignore[attr-defined]
                ("/gateway.internal.", "/grpc.")):
            return handler
        return _wrap(handler)


def _wrap(h: Any) -> Any:
    if h.request_streaming and h.response_streaming:
        inner, make = h.stream_stream, grpc.stream_stream_rpc_method_handler
    elif h.request_streaming:
        inner, make = h.stream_unary, grpc.stream_unary_rpc_method_handler
    elif h.response_streaming:
        inner, make = h.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        inner, make = h.unary_unary, grpc.unary_unary_rpc_method_handler
    if inspect.isasyncgenfunction(inner):
        async def agen(request: Any, context: Any) -> Any:
            _model_id.set(model_id_of(context.invocation_metadata()))  # the call's own task
            try:
                async for m in inner(request, context):
                    yield m
            except MultiplexedModelError as e:
                await context.abort(e.code, e.details, _report(context))
            context.set_trailing_metadata(_report(context))
        fn: Any = agen
    elif inspect.iscoroutinefunction(inner):
        async def coro(request: Any, context: Any) -> Any:
            _model_id.set(model_id_of(context.invocation_metadata()))
            try:
                result = await inner(request, context)
            except MultiplexedModelError as e:
                await context.abort(e.code, e.details, _report(context))
            context.set_trailing_metadata(_report(context))
            return result
        fn = coro
    elif h.response_streaming:
        def gen(request: Any, context: Any) -> Any:
            # grpc may resume a plain generator on any executor thread: set per message.
            mid = model_id_of(context.invocation_metadata())
            it = None
            while True:
                token = _model_id.set(mid)
                try:
                    if it is None:
                        it = iter(inner(request, context))
                    item = next(it)
                except StopIteration:
                    context.set_trailing_metadata(_report(context))
                    return
                except MultiplexedModelError as e:
                    context.abort(e.code, e.details, _report(context))
                finally:
                    _model_id.reset(token)
                yield item
        fn = gen
    else:
        def plain(request: Any, context: Any) -> Any:
            token = _model_id.set(model_id_of(context.invocation_metadata()))
            try:
                result = inner(request, context)
            except MultiplexedModelError as e:
                context.abort(e.code, e.details, _report(context))
            else:
                context.set_trailing_metadata(_report(context))
                return result
            finally:
                _model_id.reset(token)
        fn = plain
    return make(fn, request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer)
