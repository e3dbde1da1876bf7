"""The dashboard's HTTP server (aiohttp, on the gateway's event loop): pages, API, files.

Every handler reads a snapshot and answers; none waits on a replica or on the call path, and
log files are read in a worker thread, a few at a time, so a busy browser costs the calls
nothing but the loop time of building its JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.dashboard import auth, logview, pages
from gateway.dashboard.api import DashboardApi
from gateway.ingress.http_limits import ConnectionLimits
from gateway.tls import ServerTLS, ServerTLSConfig, http_listener

log = logging.getLogger("gateway.dashboard")

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
SHUTDOWN_S = 2.0
LOG_READS = 2
"""Log files read at once (worker threads); more requests wait their turn."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _headers(resp: web.StreamResponse) -> None:
    resp.headers["Content-Security-Policy"] = pages.CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("Cache-Control", "no-store")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status,
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


class DashboardServer:
    """`port = await start()`, `await stop()`."""

    def __init__(self, api: DashboardApi, host: str, port: int,
                 token: Callable[[], str | None],
                 tls_config: ServerTLSConfig | None = None) -> None:
        self.api = api
        self.host = host
        self.port = port
        self._token = token
        self.tls_config = tls_config
        self.tls: ServerTLS | None = None
        """The listener's certificate (re-read on rotation) once started with `dashboard.tls`."""
        self._runner: web.AppRunner | None = None
        self._reads = asyncio.Semaphore(LOG_READS)
        self.limits = ConnectionLimits()  # slow and too many clients (see http_limits)
        self._failed_logins = auth.FailedLogins()

    # -- lifecycle ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.limits.middleware, self._guard],
                              client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self._page("overview", "Serve applications"))
        r.add_get("/apps/{app}", self._app_page)
        r.add_get("/replicas/{replica_id}", self._replica_page)
        r.add_get("/logs/gateway", self._page("log", "Gateway log", {"component": "gateway"}))
        r.add_get("/processes", self._page("processes", "Processes"))
        r.add_get("/records", self._page("records", "Prediction records"))
        r.add_get("/login", self._login_form)
        r.add_post("/login", self._login)
        r.add_get("/logout", self._logout)
        r.add_get("/static/{name}", self._static)
        r.add_get("/api/serve/applications/", self._applications)
        r.add_get("/api/serve/applications", self._applications)
        r.add_get("/api/gateway/overview", self._answer(self.api.overview))
        r.add_get("/api/gateway/processes", self._answer(self.api.processes))
        r.add_get("/api/gateway/records", self._answer(self.api.records_view))
        r.add_get("/api/gateway/timeseries", self._timeseries)
        r.add_get("/api/gateway/deployments/{app}/{deployment}", self._deployment)
        r.add_get("/api/gateway/replicas/{replica_id}", self._replica)
        r.add_get("/api/gateway/logs", self._logs)
        return app

    async def start(self) -> int:
        # aiohttp logs every malformed request (an overlong URL, a bad header) with a traceback:
        # a client could fill the gateway's log with them. Handler failures are logged by
        # _guard; the protocol's own complaints are dropped.
        quiet = logging.getLogger("gateway.dashboard.http")
        quiet.setLevel(logging.CRITICAL + 1)
        # A page still loading when the gateway stops gets a moment, not aiohttp's minute.
        tls, ctx = http_listener(self.host, self.tls_config, "dashboard.tls", "the dashboard")
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, logger=quiet,
                               shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        self.limits.install(runner.server)
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, ssl_context=ctx)
        self.tls = tls
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"dashboard cannot listen on {self.host}:{self.port}: "
                          f"{e.strerror or e}") from None
        self._runner = runner
        addr = runner.addresses[0]
        self.port = int(addr[1])
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- access -------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self._token()
        # A browser holding a client certificate this dashboard's CA signed (mTLS) is the
        # check; without one, and without a token, only loopback Host names are answered.
        mutual = self.tls is not None and self.tls.mutual
        if token is None and not mutual and not auth.host_ok(request.host, self.host):
            resp: web.StreamResponse = _error(
                403, "the dashboard answers only loopback host names (set admin.token or "
                     "dashboard.tls.client_ca_file to expose it)")
        elif (token is not None and not request.path.startswith(("/static/", "/login"))
              and not auth.authorized(token, request.headers.get("Authorization", ""),
                                      request.cookies.get(auth.COOKIE, ""))):
            if request.path.startswith("/api/"):
                resp = _error(401, "this gateway has an admin token: send it as "
                                   "'Authorization: Bearer <token>'")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
            else:
                resp = _redirect("/login?" + _query(next=request.path_qs))
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as e:  # aiohttp's own (405, 413): answered as they are
                resp = web.Response(status=e.status, text=e.text, headers=e.headers)
            except Exception:
                log.exception("dashboard: %s failed", request.path)
                resp = _error(500, "internal error (see the gateway log)")
        _headers(resp)
        return resp

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        if self._token() is None:
            return _redirect("/")
        nxt = auth.safe_next(request.query.get("next", "/"))
        return web.Response(text=pages.login(nxt, False), content_type="text/html")

    async def _login(self, request: web.Request) -> web.StreamResponse:
        token = self._token()
        if token is None:
            return _redirect("/")
        form = await request.post()
        offered = str(form.get("token", ""))
        nxt = auth.safe_next(str(form.get("next", "/")))
        if not self._failed_logins.allow():  # a guesser gets ten tries a minute, not thousands
            return web.Response(text="too many failed logins: try again in a minute",
                                status=429, headers={"Retry-After": str(
                                    self._failed_logins.retry_after_s())})
        if not auth.token_ok(token, offered):
            self._failed_logins.failed()
            await asyncio.sleep(0.3)
            return web.Response(text=pages.login(nxt, True), status=401,
                                content_type="text/html")
        resp = _redirect(nxt)
        # Over HTTPS the browser never sends the session cookie on a plaintext connection.
        resp.set_cookie(auth.COOKIE, auth.session_value(token), httponly=True,
                        samesite="Strict", path="/", secure=self.tls is not None,
                        max_age=auth.SESSION_TTL_S)
        return resp

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        resp = _redirect("/login" if self._token() is not None else "/")
        resp.del_cookie(auth.COOKIE, path="/")
        return resp

    # -- pages --------------------------------------------------------------------------

    def _page(self, kind: str, title: str, data: dict[str, str] | None = None) -> Handler:
        async def handler(_request: web.Request) -> web.StreamResponse:
            return self._html(kind, title, data)
        return handler

    def _html(self, kind: str, title: str, data: dict[str, str] | None = None,
              status: int = 200) -> web.Response:
        text = pages.page(kind, title, data, logout=self._token() is not None)
        return web.Response(text=text, status=status, content_type="text/html")

    async def _app_page(self, request: web.Request) -> web.StreamResponse:
        app = request.match_info["app"]
        if app not in self.api.gw.controller.apps:
            return self._html("missing", f"No application {app!r}", status=404)
        return self._html("application", f"Application {app}", {"app": app})

    async def _replica_page(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["replica_id"]
        if self.api.replica(rid) is None:
            return self._html("missing", f"No replica {rid!r}", status=404)
        return self._html("replica", f"Replica {rid}", {"replica": rid})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC / name
        ctype = STATIC_TYPES.get(path.suffix)
        if ctype is None or "/" in name or name.startswith(".") or not path.is_file():
            return _error(404, "no such file")
        resp = web.Response(body=path.read_bytes(), content_type=ctype)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    # -- API ----------------------------------------------------------------------------

    def _answer(self, build: Callable[[], Any]) -> Handler:
        async def handler(_request: web.Request) -> web.StreamResponse:
            return _json(build())
        return handler

    async def _applications(self, _request: web.Request) -> web.StreamResponse:
        return _json(self.api.applications())

    async def _timeseries(self, request: web.Request) -> web.StreamResponse:
        app = request.query.get("application", "")
        if not app:
            return _error(400, "give ?application=<name> (and optionally &deployment=)")
        return _json(self.api.timeseries(app, request.query.get("deployment", "")))

    async def _deployment(self, request: web.Request) -> web.StreamResponse:
        data = self.api.deployment(request.match_info["app"], request.match_info["deployment"])
        return _json(data) if data is not None else _error(404, "no such deployment")

    async def _replica(self, request: web.Request) -> web.StreamResponse:
        data = self.api.replica(request.match_info["replica_id"])
        return _json(data) if data is not None else _error(404, "no such replica")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        if q.get("component") == "gateway":
            path: Path | None = self.api.gateway_log
        elif "replica" in q:
            path = self.api.replica_log_path(q["replica"])
            if path is None:
                return _error(404, "no log for that replica (unknown, or an external one)")
        else:
            return _error(400, "give ?replica=<replica id> or ?component=gateway")
        try:
            after = int(q["after"]) if q.get("after") else None
            before = int(q["before"]) if q.get("before") else None
            limit = int(q.get("limit", logview.DEFAULT_LINES))
        except ValueError:
            return _error(400, "after, before and limit are integers")
        level = q.get("level", "")
        if level and level.upper() not in logview.LEVELS:
            return _error(400, f"level is one of {', '.join(logview.LEVELS)}")
        assert path is not None
        scrub = self.api.scrub
        # Reading, scrubbing (before the search: see logview), filtering and JSON encoding all
        # run in a worker thread, a bounded window per request.
        async with self._reads:
            text = await asyncio.get_running_loop().run_in_executor(
                None, logview.read_json, path, after, level, q.get("q", "")[:200], limit,
                scrub if scrub.secrets else None, before)
        return web.Response(text=text, content_type="application/json")


def _query(**params: str) -> str:
    from urllib.parse import urlencode

    return urlencode(params)
