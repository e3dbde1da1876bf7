"""The `gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

# grpc core logs every failed TLS handshake (a plaintext client on a TLS port, a scanner) as
# an INFO line on stderr, unthrottled; the gateway logs what matters itself. Read once, when
# grpc is first imported: so before any gateway module that imports it, and only when the
# user did not choose a verbosity.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
from gateway.event_loop import disarm_fork_handlers

# grpc's fork handlers off (also read when grpc is first imported): uvloop's spawn of a replica
# with them armed crashes it now and then (gateway/event_loop.py).
disarm_fork_handlers()

from gateway.config import ConfigError, GatewayConfig, load_config  # noqa: E402
from gateway.config_source import hide_values  # noqa: E402

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:9001"
TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"


def _logs_dir(config: GatewayConfig) -> Path:
    return Path(config.logging_config.logs_dir or "logs")


async def _run(config: GatewayConfig, loop_line: str = "") -> int:
    from gateway.app import Gateway
    from gateway.dataplane.method_sources import MethodSourceError
    from gateway.event_loop import running_loop_name

    gw = Gateway(config, logs_dir=_logs_dir(config), console_logs=True)
    if running_loop_name() != config.proxy.event_loop:
        logging.getLogger("gateway").warning("%s", loop_line)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The one place signals are handled: SIGINT (Ctrl-C) and SIGTERM both drain and stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: re-read every listener's TLS files now (they are also re-read when they change).
    from gateway.tls import reload_all

    loop.add_signal_handler(signal.SIGHUP, reload_all)
    # Start-up may wait a minute for replicas; a signal meanwhile stops it right away.
    starter = asyncio.ensure_future(gw.start())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not starter.done():
        print("gateway: stopping during start-up", flush=True)
        starter.cancel()  # start() drains and stops what had started
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await starter
        _ignore_stop_signals(loop)
        print("gateway: stopped", flush=True)
        return EXIT_OK
    try:
        starter.result()
    except (OSError, MethodSourceError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        await gw.stop(0)
        return EXIT_FAILED
    from gateway.tls import label

    print(f"gateway: serving gRPC on {gw.address}{label(gw.tls)}", flush=True)
    print(f"gateway: event loop {running_loop_name()}", flush=True)
    if gw.http is not None:
        print(f"gateway: serving HTTP on {gw.http.address}{label(gw.http.tls)}", flush=True)
    print(f"gateway: admin service on {config.admin.host}:{gw.admin_port}"
          f"{label(gw.admin.tls)}", flush=True)
    if gw.metrics_port:
        prom = config.metrics.prometheus
        print(f"gateway: metrics on http://{prom.host}:{gw.metrics_port}/metrics", flush=True)
    if gw.dashboard is not None:
        print(f"gateway: dashboard on {gw.dashboard.url}{label(gw.dashboard.server.tls)}",
              flush=True)
    for name, app in gw.controller.apps.items():
        print(f"gateway: application {name!r}: {app.status}", flush=True)
    stopped = asyncio.ensure_future(gw.wait_stopped())
    await asyncio.wait({stopper, stopped}, return_when=asyncio.FIRST_COMPLETED)
    print("gateway: draining", flush=True)
    await gw.stop()
    stopper.cancel()
    _ignore_stop_signals(loop)
    print("gateway: stopped", flush=True)
    return EXIT_OK


def _ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Stopped: a repeated SIGTERM/SIGINT from now on must not kill us (exit -15) once the
    loop closes (which would restore the default dispositions)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"gateway: invalid config:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    if args.port is not None:
        config = config.model_copy(
            update={"proxy": config.proxy.model_copy(update={"port": args.port})}
        )
    # GATEWAY_ENABLE_MEMORY_PROFILING=1: a memray tracker for this process (replicas run
    # their own); read here, at start-up.
    from gateway.event_loop import loop_factory
    from gateway.logs.profiling import memory_profiler

    factory, loop_line = loop_factory(config.proxy.event_loop)
    with memory_profiler(_logs_dir(config), "gateway", os.environ), \
            asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run(config, loop_line))


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.config import expand_env, parse_config, read_yaml

    try:
        data = read_yaml(args.config)
        config = parse_config(data, str(args.config))
        _, used = expand_env(data or {}, str(args.config), os.environ)
    except ConfigError as e:
        print(f"gateway: invalid config:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    from gateway.tls import config_problems

    missing = [hide_values(m, used) for m in [*_missing_modules(config),
                                              *config_problems(config)]]
    if missing:
        print("gateway: invalid config:\n" + "\n".join(f"{args.config}: {m}" for m in missing),
              file=sys.stderr)
        return EXIT_USAGE
    names = ", ".join(a.name for a in config.applications) or "none"
    print(f"{args.config}: OK (applications: {names})")
    return EXIT_OK


def _missing_modules(config: GatewayConfig) -> list[str]:
    """Modules the config names that cannot be found from here (replicas run with the current
    directory on their path, as `gateway run` started here would)."""
    import importlib.util

    from gateway.dataplane.method_sources import MethodSourceError, load_method_sources

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    out = []
    try:
        load_method_sources(config.proto_files.files, config.proto_files.import_paths,
                            config.descriptor_sets)
    except MethodSourceError as e:
        out.append(str(e))
    named = [(f"proto_modules[{i}]", m) for i, m in enumerate(config.proto_modules)]
    for a in config.applications:
        for d in a.deployments:
            if d.import_path is not None:
                named.append((f"application {a.name!r}, deployment {d.name!r}: import_path",
                              d.import_path.partition(":")[0]))
    for where, module in named:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        except Exception as e:  # find_spec imports the parent packages: their code may raise
            out.append(f"{where}: importing a parent package of {module!r} failed: "
                       f"{type(e).__name__}: {e}")
            continue
        if not found:
            out.append(f"{where}: module {module!r} not found")
    return out


def _admin(args: argparse.Namespace, action: str) -> int:
    """Run one admin call; unreachable, refused and invalid each get a message and exit code."""
    from gateway.admin.client import AdminAuthError, AdminClient, AdminError, AdminUnreachable
    from gateway.tls import ClientTLSConfig, TLSError

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    used: dict[str, str] = {}  # values `deploy` expanded: never printed back
    tls = None
    if args.ca_file or args.cert_file or args.key_file or args.server_name:
        try:
            tls = ClientTLSConfig(ca_file=args.ca_file, cert_file=args.cert_file,
                                  key_file=args.key_file, server_name=args.server_name)
        except ValueError:
            print("gateway: pass both --cert-file and --key-file, or neither", file=sys.stderr)
            return EXIT_USAGE
    try:
        with AdminClient(args.address, token or None, timeout=args.timeout,
                         tls=tls) as client:
            if action == "status":
                print(client.status().to_yaml(verbose=args.verbose), end="")
            elif action == "config":
                print(client.config_yaml(), end="")
            elif action == "deploy":
                try:
                    text, used = _expanded_for_deploy(args.config)
                except ConfigError as e:
                    print(f"gateway: invalid config:\n{e}", file=sys.stderr)
                    return EXIT_USAGE
                print(hide_values(client.deploy(text, source=str(args.config),
                                                timeout=args.timeout), used))
            elif action == "shutdown":
                print(client.shutdown())
            elif action == "actuals":
                return _send_actuals(client, args)
    except TLSError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AdminUnreachable as e:
        print(f"gateway: {e}\n(is the gateway running? use --address host:port"
              f"{'' if tls else '; a TLS admin service needs --ca-file'})",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except AdminAuthError as e:
        print(f"gateway: {e}\n(pass the admin token with --token or ${TOKEN_ENV})",
              file=sys.stderr)
        return EXIT_DENIED
    except AdminError as e:
        import grpc

        # The gateway cannot know which values came from the operator's environment; we do.
        msg = hide_values(str(e), used)
        if e.code is grpc.StatusCode.INVALID_ARGUMENT:
            print(f"gateway: invalid config:\n{msg}", file=sys.stderr)
            return EXIT_USAGE
        print(f"gateway: {action} failed: {msg}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _expanded_for_deploy(path: str) -> tuple[str, dict[str, str]]:
    """The config file with `${VAR}` expanded in the operator's environment (this process's,
    as envsubst or kubectl would), checked as `gateway check` checks it, as YAML to send
    (a `${` left in it, literal or inside a value, sent as `$${`); and the values put in."""
    import yaml

    from gateway.config import expand_env, parse_config, read_yaml
    from gateway.config_source import escape_refs

    data = read_yaml(path)
    parse_config(data, str(path))  # the same verdict as `gateway check`; no value echoed
    expanded, used = expand_env(data or {}, str(path), os.environ)
    return str(yaml.safe_dump(escape_refs(expanded), sort_keys=False)), used


def _send_actuals(client: Any, args: argparse.Namespace) -> int:
    """`gateway actuals`: a CSV of `prediction_id,actual` to the LogActuals RPC, in chunks."""
    from gateway.pb import admin_pb2
    from gateway.records.pipeline import ActualsFileError, read_actuals_csv

    try:
        rows = read_actuals_csv(args.file)
    except ActualsFileError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return EXIT_USAGE
    accepted = rejected = 0
    messages = []
    for i in range(0, len(rows), 1000):
        req = admin_pb2.LogActualsRequest(
            application=args.application,
            actuals=[admin_pb2.Actual(**r) for r in rows[i : i + 1000]])
        resp = client._call("LogActuals", req)
        accepted += resp.accepted
        rejected += resp.rejected
        messages.append(resp.message)
    print(f"{args.file}: {accepted} actual(s) accepted, {rejected} rejected"
          + (f" ({messages[-1]})" if messages else ""))
    return EXIT_OK if rejected == 0 else EXIT_FAILED


def _admin_parser(sub: Any, name: str, help: str, action: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("--address", "-a", default=DEFAULT_ADMIN_ADDRESS,
                   help=f"admin service of the gateway (default {DEFAULT_ADMIN_ADDRESS})")
    p.add_argument("--token", default=None,
                   help=f"admin token (default: ${TOKEN_ENV}); sent as 'Bearer <token>'")
    for flag, env, what in (
            ("--ca-file", "GATEWAY_ADMIN_CA_FILE", "CA bundle of an admin service on TLS"),
            ("--cert-file", "GATEWAY_ADMIN_CERT_FILE", "client certificate (mTLS)"),
            ("--key-file", "GATEWAY_ADMIN_KEY_FILE", "client key (mTLS)"),
            ("--server-name", "GATEWAY_ADMIN_SERVER_NAME",
             "name to check in the server certificate (default: the address's host)")):
        p.add_argument(flag, default=os.environ.get(env) or None, help=f"{what} (${env})")
    p.add_argument("--timeout", type=float, default=10.0 if action != "deploy" else 300.0,
                   help="seconds to wait for the answer")
    p.set_defaults(func=lambda a: _admin(a, action))
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="gRPC observability gateway")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the gateway in the foreground")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--port", type=int, default=None, help="override proxy.port")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("config")
    check.set_defaults(func=cmd_check)
    status = _admin_parser(sub, "status", "print the running gateway's status (YAML)", "status")
    status.add_argument("--verbose", "-v", action="store_true",
                        help="also list each replica and the proxy address")
    _admin_parser(sub, "config", "print the config the gateway last received (redacted)",
                  "config")
    deploy = _admin_parser(sub, "deploy", "apply a config file to the running gateway",
                           "deploy")
    deploy.add_argument("config", help="YAML config file")
    _admin_parser(sub, "shutdown", "drain and stop the running gateway", "shutdown")
    actuals = _admin_parser(sub, "actuals", "send delayed actuals (a CSV of prediction_id,actual)"
                            " to join earlier prediction records", "actuals")
    actuals.add_argument("--application", required=True,
                         help="application whose prediction records the actuals join")
    actuals.add_argument("file", help="CSV file: prediction_id,actual (header line optional)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s - %(message)s"
    )
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
