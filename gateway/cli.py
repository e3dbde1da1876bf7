"""The `gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _logs_dir(config: GatewayConfig) -> Path:
    return Path(config.logging_config.logs_dir or "logs")


async def _run(config: GatewayConfig) -> int:
    from gateway.server import Gateway

    gw = Gateway(config, logs_dir=_logs_dir(config))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The one place signals are handled: SIGINT (Ctrl-C) and SIGTERM both drain and stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gw.start()
    except OSError as e:
        print(f"gateway: {e}", file=sys.stderr)
        await gw.stop(0)
        return EXIT_FAILED
    print(f"gateway: serving gRPC on {gw.address}", flush=True)
    for name, app in gw.controller.apps.items():
        print(f"gateway: application {name!r}: {app.status}", flush=True)
    stopper = asyncio.ensure_future(stop.wait())
    stopped = asyncio.ensure_future(gw.wait_stopped())
    await asyncio.wait({stopper, stopped}, return_when=asyncio.FIRST_COMPLETED)
    print("gateway: draining", flush=True)
    await gw.stop()
    stopper.cancel()
    print("gateway: stopped", flush=True)
    return EXIT_OK


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
    return asyncio.run(_run(config))


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"gateway: invalid config:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    names = ", ".join(a.name for a in config.applications) or "none"
    print(f"{args.config}: OK (applications: {names})")
    return EXIT_OK


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
