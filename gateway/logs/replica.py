"""Logging inside a replica process: its file, its prints, its access lines."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TextIO

import grpc

from gateway.logs.access import AccessLog, access_record
from gateway.logs.context import CallContext, ContextFilter, _call, request_id_of
from gateway.logs.format import TextFormatter, file_handler
from gateway.logs.settings import ACCESS, ENV_REPLICA_LOGGING, LogSettings, replica_log_file
from gateway.runtime.sync_stream import sync_stream

# Calls the replica serves for the gateway itself: not user traffic, so no access line.
INTERNAL_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", "/gateway.internal.")


LINE_CAP = 64 * 1024
"""Characters a replica's print may hold back waiting for a newline: past it the partial line
is written as a record of its own (progress dots never grow memory without bound)."""


class _LineWriter:
    """Stands in for sys.stdout/sys.stderr in a replica: each printed line becomes a record.

    Linear in what is written: the partial line is kept as a list of pieces, and only the new
    text is searched for a newline."""

    def __init__(self, logger: logging.Logger, level: int, fallback: TextIO | None) -> None:
        self._logger = logger
        self._level = level
        self._parts: list[str] = []
        self._held = 0
        self._fallback = fallback
        self._local = threading.local()

    def write(self, s: str) -> int:
        if getattr(self._local, "busy", False):  # logging itself failed and wrote to stderr
            return self._fallback.write(s) if self._fallback is not None else len(s)
        n = len(s)
        if "\n" in s:
            *lines, rest = s.split("\n")
            self._parts.append(lines[0])
            first, self._parts, self._held = "".join(self._parts), [], 0
            for line in (first, *lines[1:]):
                for i in range(0, max(len(line), 1), LINE_CAP):
                    self._emit(line[i:i + LINE_CAP])
            s = rest
        if s:
            self._parts.append(s)
            self._held += len(s)
            while self._held >= LINE_CAP:
                held = "".join(self._parts)
                self._emit(held[:LINE_CAP])
                held = held[LINE_CAP:]
                self._parts, self._held = ([held] if held else []), len(held)
        return n

    def _emit(self, line: str) -> None:
        self._local.busy = True
        try:
            self._logger.log(self._level, "%s", line)
        finally:
            self._local.busy = False

    def flush(self) -> None:
        if self._parts:
            line, self._parts, self._held = "".join(self._parts), [], 0
            self._emit(line)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self._fallback is None:
            raise OSError("no file descriptor")
        return self._fallback.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


class _NotAccess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.__dict__.get("access", False)


class ReplicaLogging:
    """Logging inside a replica process: its own file, optional console stream, access log."""

    def __init__(self, settings: LogSettings, application: str, deployment: str,
                 replica_id: str) -> None:
        self.settings = settings
        self.application = application
        self.deployment = deployment
        self.replica_id = replica_id
        self.log_file = replica_log_file(settings.logs_dir, replica_id)
        self.access: AccessLog | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReplicaLogging | None:
        raw = env.get(ENV_REPLICA_LOGGING)
        if not raw:
            return None
        try:
            settings = LogSettings.from_json(raw)
        except (ValueError, TypeError):
            return None
        return cls(settings, env.get("GATEWAY_APPLICATION", ""),
                   env.get("GATEWAY_DEPLOYMENT", ""), env.get("GATEWAY_REPLICA_ID", ""))

    def start(self) -> None:
        """Route the process's logging and prints to the replica's file (and the console)."""
        flt = ContextFilter("replica", self.application, self.deployment, self.replica_id)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        fh = file_handler(self.log_file, self.settings)
        fh.addFilter(flt)
        root.addHandler(fh)
        if self.settings.stream_replica_logs:
            # The real stderr is the pipe the gateway prints, prefixed, on its console.
            ch = logging.StreamHandler(sys.__stderr__)
            ch.setFormatter(TextFormatter())
            ch.addFilter(flt)
            ch.addFilter(_NotAccess())  # the gateway's console already has one line per call
            root.addHandler(ch)
        root.setLevel(self.settings.log_level)
        sys.stdout = _LineWriter(logging.getLogger("gateway.replica.stdout"), logging.INFO,
                                 sys.__stderr__)  # type: ignore[assignment]
        sys.stderr = _LineWriter(logging.getLogger("gateway.replica.stderr"), logging.ERROR,
                                 sys.__stderr__)  # type: ignore[assignment]
        if not self.settings.disable_access_log:
            self.access = AccessLog(logging.getLogger(ACCESS), self._to_record)

    def stop(self) -> None:
        if self.access is not None:
            self.access.close()
            self.access = None
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        for h in logging.getLogger().handlers:
            h.flush()

    def _to_record(self, item: tuple[str, grpc.StatusCode, float, float, str]) -> (
        logging.LogRecord | None
    ):
        method, code, latency_s, end_time, rid = item
        return access_record(
            logging.getLogger(ACCESS), method=method, code=code, latency_s=latency_s,
            end_time=end_time, request_id=rid, application=self.application,
            deployment=self.deployment, replica=self.replica_id,
        )

    def record_call(self, method: str, code: grpc.StatusCode, latency_s: float,
                    request_id: str) -> None:
        if self.access is not None:
            self.access((method, code, latency_s, time.time(), request_id))

    # Calls that arrive over the mux (gateway/runtime/mux_server.py) ------------------

    def mux_on_call(self, method: str, ctx: Any, code: grpc.StatusCode, seconds: float) -> None:
        """`MuxServer.on_call`: one access line per call."""
        self.record_call(method, code, seconds, request_id_of(ctx.invocation_metadata()))

    def wrap_unary_handlers(self, handlers: dict[str, Any]) -> dict[str, Any]:
        """Handlers that set the call context, so the servicer's own logs carry the id."""
        return {path: _with_context(path, h) for path, h in handlers.items()}

    # Calls that arrive as plain gRPC calls (streams, or local_transport: grpc) --------

    def interceptor(self) -> grpc.aio.ServerInterceptor:  # type: ignore[type-arg]
        return _ReplicaInterceptor(self)


def _with_context(path: str, handler: Any) -> Any:
    inner = handler.unary_unary
    if inner is None:
        return handler

    async def unary_unary(request: Any, context: Any) -> Any:
        token = _call.set(CallContext(request_id_of(context.invocation_metadata()), path))
        try:
            result = inner(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            _call.reset(token)

    return handler._replace(unary_unary=unary_unary)


def _code_of(exc: BaseException | None, context: Any) -> grpc.StatusCode:
    code = None
    with contextlib.suppress(Exception):
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio may report the raw enum value
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _ReplicaInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Sets the call context and writes the access line for plain gRPC calls to a replica."""

    def __init__(self, logging_: ReplicaLogging) -> None:
        self._logging = logging_

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or path.startswith(INTERNAL_PREFIXES):
            return handler
        return self._wrap(path, handler)

    def _wrap(self, path: str, h: Any) -> Any:
        rl = self._logging

        def begin(context: Any) -> tuple[contextvars.Token[CallContext | None], str, float]:
            rid = request_id_of(context.invocation_metadata())
            return _call.set(CallContext(rid, path)), rid, time.perf_counter()

        def end(token: contextvars.Token[CallContext | None], rid: str, t0: float,
                exc: BaseException | None, context: Any) -> None:
            try:
                _call.reset(token)
            except ValueError:
                pass  # a stream finalised in another context (closed by grpc after a cancel)
            rl.record_call(path, _code_of(exc, context), time.perf_counter() - t0, rid)

        if not h.response_streaming:
            inner = h.stream_unary if h.request_streaming else h.unary_unary
            make = (grpc.stream_unary_rpc_method_handler if h.request_streaming
                    else grpc.unary_unary_rpc_method_handler)

            if not inspect.iscoroutinefunction(inner):
                # A plain method stays plain, so grpc runs it on an executor thread with the
                # sync context (where abort() raises), as it would without this wrapper.
                def unary_sync(request: Any, context: Any) -> Any:
                    token, rid, t0 = begin(context)
                    exc: BaseException | None = None
                    try:
                        return inner(request, context)
                    except BaseException as e:
                        exc = e
                        raise
                    finally:
                        end(token, rid, t0, exc, context)

                return make(unary_sync, request_deserializer=h.request_deserializer,
                            response_serializer=h.response_serializer)

            async def unary(request: Any, context: Any) -> Any:
                token, rid, t0 = begin(context)
                exc: BaseException | None = None
                try:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(token, rid, t0, exc, context)

            return make(unary, request_deserializer=h.request_deserializer,
                        response_serializer=h.response_serializer)

        inner_s = h.stream_stream if h.request_streaming else h.unary_stream
        make_s = (grpc.stream_stream_rpc_method_handler if h.request_streaming
                  else grpc.unary_stream_rpc_method_handler)

        if not (inspect.iscoroutinefunction(inner_s) or inspect.isasyncgenfunction(inner_s)):
            # A plain generator: run on an executor thread as grpc.aio would, its abort() sent
            # in order after the messages before it (gateway/runtime/sync_stream.py).
            inner_s = functools.partial(sync_stream, inner_s)

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            token, rid, t0 = begin(context)
            exc: BaseException | None = None
            result: Any = None
            try:
                result = inner_s(request, context)
                if hasattr(result, "__aiter__"):
                    async for msg in result:
                        yield msg
                elif inspect.isawaitable(result):
                    await result  # a handler that writes with context.write()
            except BaseException as e:
                exc = e
                if isinstance(e, GeneratorExit) and hasattr(result, "aclose"):
                    # Closed mid-stream (cancelled): close the method's generator now, not
                    # whenever it is collected, so a plain one's thread stops at once.
                    await result.aclose()
                raise
            finally:
                end(token, rid, t0, exc, context)

        return make_s(stream, request_deserializer=h.request_deserializer,
                      response_serializer=h.response_serializer)
