"""The HTTP listener (aiohttp) in the gateway process, beside the gRPC one.

Routing: the `application` header, else the longest `route_prefix` that matches (on a path
segment boundary), else the only application. Inside an application's prefix:

    GET  /v2/health/live | /v2/health/ready            ServerLive / ServerReady
    GET  /v2                                            ServerMetadata
    GET  /v2/models/{model}[/versions/{version}]        ModelMetadata
    GET  /v2/models/{model}[/versions/{version}]/ready  ModelReady
    POST /v2/models/{model}[/versions/{version}]/infer  ModelInfer (JSON or binary tensors)
    POST /{package.Service}/{Method}                    any known unary or server-streaming method

Every call goes through the gRPC data plane (gateway/ingress/http/call.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.dataplane.methods import MethodTable
from gateway.dataplane.proxy import Proxy, valid_request_id
from gateway.ingress.http import call, listener, oip_rest, transcode
from gateway.ingress.http.body import read_body
from gateway.ingress.http.errors import RestError, error_body, http_status
from gateway.ingress.http.listener import Req
from gateway.ingress.http.offload import Offload
from gateway.logs.core import call_context
from gateway.metrics.http import HttpMetrics
from gateway.pb import grpc_predict_v2_pb2 as pb
from gateway.tls import ServerTLS, http_listener, scheme

log = logging.getLogger("gateway.http")

OIP = "/inference.GRPCInferenceService/"
_MODEL = re.compile(
    r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<op>/ready|/infer)?"
)
_METHOD = re.compile(r"/[A-Za-z_][\w.]*/[A-Za-z_]\w*")
_RESERVED_KEYS = frozenset({"application", "x-request-id", "request_id", "te", "content-type",
                            "user-agent", "grpc-timeout", "grpc-encoding",
                            "grpc-accept-encoding"})
_MD_KEY = re.compile(r"[0-9a-z_.-]{1,200}")
_UNREAD_BODY = frozenset({408, 413, 415})
"""Answers given before the body was read: the connection is closed after them."""
LINGER_S = 2.0
"""After an answer given before the body was read, its rest is drained this long (so the
client reads the answer rather than a reset), not aiohttp's 10 s."""


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc, separators=(",", ":")).encode(),
                        content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message),
                        content_type="application/json", headers=headers)


class HttpIngress:
    """`await start()` binds the listener; `await stop()` closes it (after the gRPC drain)."""

    def __init__(
        self, proxy: Proxy, methods: MethodTable, config: GatewayConfig,
        metrics: HttpMetrics | None, ready: Callable[[], bool],
    ) -> None:
        self.proxy = proxy
        self.methods = methods
        self.metrics = metrics
        self.ready = ready
        self.host = config.http.host
        self.port_wanted = config.http.port
        self.tls_config = config.http.tls
        self.tls: ServerTLS | None = None
        """The listener's certificate (re-read on rotation) once started with `http.tls`."""
        self.max_body = config.proxy.max_message_bytes
        self.body_timeout_s = config.http.body_timeout_s
        self.max_connections = config.http.max_connections
        self.offload = Offload()
        self.server: listener.CappedServer | None = None
        self.port = 0
        self.in_proxy = 0
        """HTTP calls inside the proxy now (the gRPC ongoing gauge leaves them out)."""
        self.prefixes: list[tuple[str, str]] = []
        self._runner: web.ServerRunner | None = None
        self.running = listener.Running()
        self.apply(config)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme(self.tls)}://{host}:{self.port}"

    def apply(self, config: GatewayConfig) -> None:
        """Follow a deploy's route prefixes (longest first, so the longest match wins)."""
        pairs = [(a.route_prefix, a.name) for a in config.applications if a.route_prefix]
        self.prefixes = sorted(((p, n) for p, n in pairs if p), key=lambda x: -len(x[0]))

    async def start(self) -> int:
        server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, listener.ClientFault) for f in server_log.filters):
            server_log.addFilter(listener.ClientFault())
        # One handler for every path (routing is ours). Bodies are read by read_body (bounded
        # after inflating), so aiohttp's decompression is off; a client leaving cancels its
        # handler, which cancels the upstream call. The keep-alive timer also closes
        # connections that never finish their headers (slowloris).
        self.server = listener.CappedServer(
            self._handle, self.max_connections, handler_cancellation=True,
            auto_decompress=False, access_log=None, keepalive_timeout=self.body_timeout_s,
            lingering_time=LINGER_S)
        # Closed after the gRPC drain (Gateway._stop): calls still running then are past the
        # grace and answered 503 (Running.stop), not aiohttp's default minute.
        tls, ctx = http_listener(self.host, self.tls_config, "http.tls", "the HTTP ingress")
        runner = web.ServerRunner(self.server, handle_signals=False,
                                  shutdown_timeout=listener.SHUTDOWN_S)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port_wanted, reuse_port=False,
                           ssl_context=ctx)
        self.tls = tls
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            self._runner = None
            raise OSError(f"cannot listen on {self.host}:{self.port_wanted} (http): "
                          f"{e.strerror or e}") from None
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None and self.server is not None:
            runner, self._runner = self._runner, None
            await self.running.stop(runner, self.server)
        self.offload.close()

    # -- per request ---------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        m = self.metrics
        if m is not None:
            m.ongoing += 1
        info = Req()
        status = 500
        # Made here when missing, so even a request refused before the proxy has one; a bad
        # one is passed on for the proxy to refuse (400, as over gRPC).
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        shown = rid if valid_request_id(rid) else str(uuid.uuid4())
        self.running.enter(info)
        resp: web.StreamResponse | None = None
        try:
            with call_context(shown, info.route):
                try:
                    resp = await self._dispatch(request, info, rid)
                except RestError as e:
                    status = e.status
                    log.log(logging.ERROR if status >= 500 else logging.WARNING,
                            "HTTP %s %s %d: %s", request.method, info.route, status, e.message)
                    resp = _error(e.status, e.message, {"x-request-id": shown})
                    if e.status in _UNREAD_BODY:
                        resp.force_close()  # the rest of the body is not worth waiting for
                    return resp
                except ConnectionResetError:
                    # The client went away while its body was read: nobody to answer.
                    status = 499
                    resp = web.Response(status=499)
                    return resp
                except asyncio.CancelledError:
                    # aiohttp cancels the handler when its client leaves (the upstream call
                    # is cancelled with it: CANCELLED in the proxy's record); the stop cuts
                    # it past the drain's grace (UNAVAILABLE in the record) and it answers.
                    if not self.running.answer_cut(request):
                        gone = request.transport is None or request.transport.is_closing()
                        status = 499 if gone else 503
                        raise
                    status = 503
                    resp = _error(503, listener.SHUTTING_DOWN, {"x-request-id": shown})
                    resp.force_close()
                    return resp
                except Exception:
                    # A gateway bug: answered in KServe's form with the request id, logged
                    # once; the deployment is not charged for a call that never reached it.
                    status = 500
                    if not info.reached:
                        info.deployment = ""
                    log.exception("HTTP %s %s failed in the gateway", request.method,
                                  info.route)
                    resp = _error(500, "internal error in the gateway (logged with request "
                                       f"id {shown})", {"x-request-id": shown})
                    return resp
            status = info.status or resp.status
            if not resp.prepared:
                resp.headers.setdefault("x-request-id", shown)
            return resp
        finally:
            info.answered = True  # being written (the drain waits for it)
            if resp is not None and self.proxy.draining:  # not reused: the stop closes idle
                resp.force_close()  # connections, and a request sent on one as it closes is lost
            if m is not None:
                m.ongoing -= 1
                m.observe(info.route, request.method, info.app, info.deployment, status,
                          time.perf_counter() - t0)

    def _route_app(self, request: web.BaseRequest, info: Req) -> tuple[str | None, str, str]:
        """(application named by header or prefix, the matched prefix, the path inside it)."""
        path = request.path
        name = request.headers.get("application")
        prefix = ""
        for p, app in self.prefixes:
            # With the header, only that application's own prefix is stripped.
            if (name is None or name == app) and (
                    p == "/" or path == p or path.startswith(p + "/")):
                name, prefix = app, p
                break
        inner = path if prefix in ("", "/") else path[len(prefix):] or "/"
        route = self.proxy.routes.get(name) if name is not None else self.proxy.default_route
        if route is not None:
            info.app, info.deployment = route.name, route.deployment
        return name, prefix.rstrip("/"), inner

    async def _dispatch(self, request: web.BaseRequest, info: Req, rid: str) -> web.StreamResponse:
        # The route label (`info.route`) stays "other" until a route template matches.
        name, base, inner = self._route_app(request, info)
        md: list[tuple[str, str]] = []
        if name is not None:
            md.append(("application", name))
        if rid:
            md.append(("x-request-id", rid))
        for key, value in request.headers.items():
            k = key.lower()
            if k.startswith("grpc-metadata-") and len(k) > 14:
                k = k[14:]
                if k in _RESERVED_KEYS or k.endswith("-bin") or not _MD_KEY.fullmatch(k):
                    continue  # routing and ids come from the request itself; no binary values
                if not (value.isascii() and value.isprintable()):
                    raise RestError(400, f"header {key[:100]!r}: a metadata value must be "
                                         "printable ASCII")
                md.append((k, value))
        verb = request.method
        if inner in ("/v2/health/live", "/v2/health/ready"):
            info.route = base + inner
            self._allow(verb, "GET")
            live = inner.endswith("live")
            if name is None and self.proxy.default_route is None:
                # No application to ask: the gateway answers for itself (probes).
                ok = True if live else self.ready()
                return _json(200 if ok else 503, {"live" if live else "ready": ok})
            method = "ServerLive" if live else "ServerReady"
            data, ctx = await self._unary(OIP + method, b"", md, info)
            if data is None:
                return self._failed(ctx)
            if live:
                ok = pb.ServerLiveResponse.FromString(data).live
            else:
                ok = pb.ServerReadyResponse.FromString(data).ready
            # KServe: 200 means true, a 4xx false.
            return _json(200 if ok else 400, {"live" if live else "ready": ok}, self._out(ctx))
        if inner in ("/v2", "/v2/"):
            info.route = base + "/v2"
            self._allow(verb, "GET")
            self._need_application(name)
            data, ctx = await self._unary(OIP + "ServerMetadata", b"", md, info)
            if data is None:
                return self._failed(ctx)
            smd = pb.ServerMetadataResponse.FromString(data)
            return _json(200, {"name": smd.name, "version": smd.version,
                               "extensions": list(smd.extensions)}, self._out(ctx))
        mm = _MODEL.fullmatch(inner)
        if mm is not None:
            return await self._model(request, info, base, mm, md, name)
        if _METHOD.fullmatch(inner) and self.methods.descriptor(inner) is not None:
            info.route = base + inner  # a known method path: a fixed, bounded set
            self._allow(verb, "POST")
            self._need_application(name)
            return await self._transcoded(request, info, inner, md, rid)
        raise RestError(404, f"no route for {verb} {request.path[:200]!r}: OIP REST is under "
                             "/v2 and JSON transcoding at /{package.Service}/{Method}")

    def _need_application(self, name: str | None) -> None:
        """404 naming the applications (and prefixes) when nothing names one and there are
        several (the proxy's own message speaks of gRPC metadata)."""
        if name is not None or self.proxy.default_route is not None:
            return
        names = ", ".join(repr(n) for n in sorted(self.proxy.routes)) or "none"
        prefixes = ", ".join(f"{p} -> {n!r}" for p, n in self.prefixes)
        raise RestError(404, f"No application matched: send header 'application' with one "
                             f"of: {names}" + (f"; or use a route_prefix ({prefixes})"
                                                if prefixes else ""))

    @staticmethod
    def _allow(verb: str, want: str) -> None:
        if verb != want:
            raise RestError(405, f"method {verb} not allowed here; use {want}")

    async def _model(self, request: web.BaseRequest, info: Req, base: str, mm: re.Match[str],
                     md: list[tuple[str, str]], name: str | None) -> web.StreamResponse:
        model, version, op = mm["model"], mm["version"] or "", mm["op"] or ""
        info.route = (base + "/v2/models/{model}" + ("/versions/{version}" if version else "")
                      + op)
        self._need_application(name)
        if op == "/infer":
            self._allow(request.method, "POST")
            body = await self._body(request)
            req_bytes, binary_out = await self.offload.run(
                len(body), oip_rest.infer_request_bytes, body,
                request.headers.get("Inference-Header-Content-Length"), model, version)
            data, ctx = await self._unary(OIP + "ModelInfer", req_bytes, md, info)
            if data is None:
                return self._failed(ctx)
            out, headers = await self.offload.run(
                len(data), oip_rest.infer_response_body, data, binary_out)
            return web.Response(status=200, body=out, headers={**headers, **self._out(ctx)})
        self._allow(request.method, "GET")
        if op == "/ready":
            ready_req = pb.ModelReadyRequest(name=model, version=version)
            data, ctx = await self._unary(OIP + "ModelReady", ready_req.SerializeToString(),
                                          md, info)
            if data is None:
                return self._failed(ctx)
            ok = pb.ModelReadyResponse.FromString(data).ready
            return _json(200 if ok else 400, {"name": model, "ready": ok}, self._out(ctx))
        meta_req = pb.ModelMetadataRequest(name=model, version=version)
        data, ctx = await self._unary(OIP + "ModelMetadata", meta_req.SerializeToString(), md, info)
        if data is None:
            return self._failed(ctx)
        return _json(200, oip_rest.metadata_json(data), self._out(ctx))

    async def _transcoded(self, request: web.BaseRequest, info: Req, path: str,
                          md: list[tuple[str, str]], rid: str) -> web.StreamResponse:
        desc = self.methods.descriptor(path)
        if desc.client_streaming:
            raise RestError(501, f"{path} is a client-streaming or bidirectional method: "
                                 "call it over gRPC (HTTP carries unary and server-streaming "
                                 "calls only)")
        raw = await self._body(request)
        body = await self.offload.run_thread(len(raw), transcode.request_bytes, desc, raw)
        if not desc.server_streaming:
            data, ctx = await self._unary(path, body, md, info)
            if data is None:
                return self._failed(ctx)
            try:
                doc = await self.offload.run_thread(len(data), transcode.response_json, desc,
                                                    data)
            except Exception as e:
                raise RestError(500, f"the answer is not a {desc.output_type.full_name}: "
                                     f"{type(e).__name__}") from None
            return _json(200, doc, self._out(ctx))
        ctx = info.ctx = call.HttpCallContext(md)
        stream = call.server_stream(self.proxy, path, body, ctx)
        info.reached = True
        self.in_proxy += 1
        try:
            # The first message decides the status: a call refused or failed before answering
            # anything gets its HTTP error, not a 200 with an error line.
            first = await anext(stream, None)
            if first is None and ctx.code is not grpc.StatusCode.OK:
                return self._failed(ctx)
            resp = web.StreamResponse(status=200, headers={
                "Content-Type": "application/x-ndjson", "x-request-id": rid})
            await resp.prepare(request)
            msg = first
            try:
                while msg is not None:
                    doc = await self.offload.run_thread(len(msg), transcode.response_json,
                                                        desc, msg)
                    await resp.write(transcode.ndjson_line({"result": doc}))
                    msg = await anext(stream, None)
                info.answered = True  # upstream is over: its end is written
                if ctx.code is not grpc.StatusCode.OK:
                    await resp.write(transcode.ndjson_line({"error": {
                        "code": ctx.code.value[0], "status": ctx.code.name,
                        "message": ctx.details}}))
                await resp.write_eof()
            except ConnectionResetError:
                info.status = 499  # the client left mid-stream; the upstream call is cancelled
            except asyncio.CancelledError:
                if not self.running.answer_cut(request):
                    raise
                if info.answered:  # cut while its end was written: nothing may follow
                    return resp
                # Cut at stop past the drain's grace: said in the stream, as a failure is.
                try:
                    await resp.write(transcode.ndjson_line({"error": {
                        "code": grpc.StatusCode.UNAVAILABLE.value[0], "status": "UNAVAILABLE",
                        "message": listener.SHUTTING_DOWN}}))
                    await resp.write_eof()
                except ConnectionResetError:
                    info.status = 499
            return resp
        finally:
            info.answered = True
            self.in_proxy -= 1
            await stream.aclose()

    async def _body(self, request: web.BaseRequest) -> bytes:
        return await read_body(request, self.max_body, self.body_timeout_s)

    async def _unary(self, path: str, body: bytes, md: list[tuple[str, str]],
                     info: Req) -> tuple[bytes | None, call.HttpCallContext]:
        ctx = info.ctx = call.HttpCallContext(md)
        info.reached = True
        self.in_proxy += 1
        try:
            data = await call.unary(self.proxy, path, body, ctx)
            info.answered = data is not None  # to convert (a refusal is answered at once)
            return data, ctx
        finally:
            self.in_proxy -= 1

    @staticmethod
    def _out(ctx: call.HttpCallContext) -> dict[str, str]:
        headers = ctx.headers()
        rid = ctx.request_id()
        if rid:
            headers["x-request-id"] = rid
        return headers

    def _failed(self, ctx: call.HttpCallContext) -> web.Response:
        status = http_status(ctx.code)
        return _error(status, ctx.details or ctx.code.name, self._out(ctx))

