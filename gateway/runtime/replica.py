"""The process that hosts one local replica: the user's servicer on an ephemeral port.

Started by the gateway as `python -m gateway.runtime.replica`; reports its port (or the
constructor's exception) on a pipe, serves `grpc.health.v1` and the internal control service,
and stops gracefully when the gateway closes its stdin (or dies); SIGTERM stops it only when
started by hand or when its gateway is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.control.auth import ControlAuthInterceptor, read_line, read_secret
from gateway.dataplane.mux import MuxServer, capture_unary_handlers
from gateway.dataplane.replicas import channel_options
from gateway.logs.profiling import memory_profiler
from gateway.logs.replica import ReplicaLogging
from gateway.pb import replica_control_pb2, replica_control_pb2_grpc
from gateway.runtime import multiplex
from gateway.runtime.guard import StartupGuard, kill_own_group


class ReplicaStartError(Exception):
    """The servicer could not be imported, built or registered."""


def load_servicer_class(import_path: str) -> type:
    module_name, _, attr = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ReplicaStartError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    obj = getattr(module, attr, None)
    if not isinstance(obj, type):
        raise ReplicaStartError(f"{import_path!r} does not name a class")
    return obj


def find_registrars(cls: type) -> list[tuple[Any, Any]]:
    """(add_X_to_server, service descriptor) for every generated `XServicer` base of `cls`."""
    found = []
    for base in cls.__mro__:
        name = base.__name__
        module = sys.modules.get(base.__module__)
        if not name.endswith("Servicer") or module is None:
            continue
        if not base.__module__.endswith("_pb2_grpc"):
            continue
        add = getattr(module, f"add_{name}_to_server", None)
        if add is None:
            continue
        found.append((add, _service_descriptor(module, name[: -len("Servicer")])))
    if not found:
        raise ReplicaStartError(
            f"{cls.__module__}.{cls.__name__} does not subclass a generated '...Servicer' class"
        )
    return found


def _service_descriptor(grpc_module: ModuleType, service: str) -> Any:
    pb2 = sys.modules.get(grpc_module.__name__.removesuffix("_grpc"))
    if pb2 is None:
        return None
    return pb2.DESCRIPTOR.services_by_name.get(service)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _Control(replica_control_pb2_grpc.ReplicaControlServicer):
    def __init__(self, servicer: Any, mux: MuxServer) -> None:
        self._servicer = servicer
        self._mux = mux

    async def Mux(self, request_iterator: Any, context: Any) -> None:
        await self._mux.serve(request_iterator, context)

    async def Reconfigure(
        self, request: replica_control_pb2.ReconfigureRequest, context: Any
    ) -> replica_control_pb2.ReconfigureResponse:
        reconfigure = getattr(self._servicer, "reconfigure", None)
        if reconfigure is not None:
            try:
                await _maybe_await(reconfigure(json.loads(request.user_config_json or "null")))
            except Exception as e:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"reconfigure failed: {type(e).__name__}: {e}",
                )
        return replica_control_pb2.ReconfigureResponse()

    async def CollectMetrics(
        self, request: replica_control_pb2.CollectMetricsRequest, context: Any
    ) -> replica_control_pb2.CollectMetricsResponse:
        from gateway.runtime import metrics as replica_metrics

        return replica_metrics.collect()


def _report(fd: int, payload: dict[str, Any]) -> None:
    if fd < 0:
        print(json.dumps(payload), flush=True)
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(payload))


async def serve(args: argparse.Namespace, logs: ReplicaLogging | None = None,
                control_secret: str = "", lifeline: int = -1,
                guard: StartupGuard | None = None) -> int:
    user_config = json.loads(args.user_config) if args.user_config else None
    try:
        cls = load_servicer_class(args.import_path)
        registrars = find_registrars(cls)
        servicer = cls()
        reconfigure = getattr(servicer, "reconfigure", None)
        if user_config is not None and reconfigure is not None:
            await _maybe_await(reconfigure(user_config))
    except Exception as e:
        msg = str(e) if isinstance(e, ReplicaStartError) else f"{type(e).__name__}: {e}"
        logging.getLogger("gateway.replica").exception("replica failed to start: %s", msg)
        _report(args.report_fd, {"error": msg})
        return 1

    interceptors: list[grpc.aio.ServerInterceptor] = [  # type: ignore[type-arg]
        ControlAuthInterceptor(control_secret)]
    capacity = multiplex.declared_capacity(cls)
    if capacity is not None:  # model ids and load failures of plain gRPC calls
        from gateway.runtime.multiplex_grpc import MultiplexInterceptor

        interceptors.append(MultiplexInterceptor())
    if logs is not None:
        interceptors.append(logs.interceptor())
    server = grpc.aio.server(options=channel_options(args.max_message_bytes),
                             interceptors=interceptors)
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    for add, descriptor in registrars:
        add(servicer, server)
        if descriptor is not None:
            names.append(descriptor.full_name)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    handlers = capture_unary_handlers([add for add, _ in registrars], servicer)
    if logs is not None:
        handlers = logs.wrap_unary_handlers(handlers)
    mux = MuxServer(handlers, args.max_message_bytes,
                    on_call=logs.mux_on_call if logs is not None and logs.access else None)
    replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(_Control(servicer, mux), server)
    reflection.enable_server_reflection(names, server)
    # 0 (the gateway's own replicas): an ephemeral port, reported on the pipe; a fixed one
    # when run by hand as a model server others reach by address (deploy/kubernetes/).
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    started: dict[str, Any] = {"port": port, "pid": os.getpid()}
    if capacity is not None:
        started["multiplexed_capacity"] = capacity
    _report(args.report_fd, started)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if guard is not None:
        guard.hand_over()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, args, stop)
    if lifeline >= 0:
        # The gateway closes its end to stop us; it also closes when the gateway dies.
        loop.add_reader(lifeline, _on_lifeline, lifeline, stop)
    # The gateway gone (its pid no longer our parent) also means stop: no orphans.
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(_parent_gone(args))]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(args.grace)
    return 0


def _on_signal(args: argparse.Namespace, stop: asyncio.Event) -> None:
    # SIGTERM/SIGINT to the whole process group (Ctrl-C, systemd's KillMode=control-group,
    # `kill -TERM -PGID`) also reach us; while our gateway lives it drains its calls first
    # and then stops us itself (lifeline), so we keep serving what it sends meanwhile.
    if args.parent_pid and os.getppid() == args.parent_pid:
        return
    stop.set()


def _on_lifeline(fd: int, stop: asyncio.Event) -> None:
    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(fd)
        stop.set()


async def _parent_gone(args: argparse.Namespace) -> None:
    parent = args.parent_pid
    while True:
        await asyncio.sleep(0.5)
        if parent and os.getppid() != parent:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.runtime.replica")
    p.add_argument("--import-path", required=True)
    p.add_argument("--user-config", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="listen port (default: any free one)")
    p.add_argument("--report-fd", type=int, default=-1)
    p.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--stdin-control", action="store_true",
                   help="stdin carries the control secret (first line); its EOF means stop")
    p.add_argument("--user-config-stdin", action="store_true",
                   help="with --stdin-control: the user_config JSON is stdin's second line")
    args = p.parse_args(argv)
    from gateway.logs import grpc_noise

    grpc_noise.install()  # forwarded non-UTF-8 metadata must not flood the replica's log
    secret, lifeline = "", -1
    if args.stdin_control:
        secret = read_secret(0)
        if args.user_config_stdin:
            # Not on the command line: argv is public (`ps`) and one argument is at most
            # 128 KiB on Linux, while a user_config may be larger or hold keys.
            args.user_config = read_line(0)
        # Keep the pipe for ourselves (not inherited by the model's subprocesses, which get
        # /dev/null as stdin instead).
        lifeline = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    # Before the model loads (which may take long, or hang): no orphan, no traceback on ^C.
    guard = StartupGuard(args.parent_pid, lifeline)
    guard.start()
    try:
        return _run(args, secret, lifeline, guard)
    finally:
        if args.parent_pid:
            # Started by a gateway, as the leader of our own group: the model's children end
            # with us. Not only once getppid() says the gateway is gone: killed, it closes our
            # lifeline before the kernel reparents us, so a quick stop still sees it as parent
            # (and nobody else would end them). A gateway that stops us kills the group anyway.
            kill_own_group()


def _run(args: argparse.Namespace, secret: str, lifeline: int, guard: StartupGuard) -> int:
    # Settings come from the gateway through the environment, read once here at start-up.
    logs = ReplicaLogging.from_env(os.environ)
    if logs is None:
        return asyncio.run(serve(args, control_secret=secret, lifeline=lifeline, guard=guard))
    logs.start()
    try:
        with memory_profiler(logs.settings.logs_dir, f"replica_{logs.replica_id}", os.environ):
            return asyncio.run(serve(args, logs, secret, lifeline, guard))
    finally:
        logs.stop()


if __name__ == "__main__":
    sys.exit(main())
