"""`make bench`: what the gateway costs per call, measured against the same replica called
directly, a minimal Python pass-through proxy and nginx, all in one run.

For each replica kind (`local`: started by the gateway from `import_path`; `external`: a plain
`grpc.aio` process this script starts, reached through `targets`) and each concurrency, h2load
drives unary `/bench.Echo/Echo` calls at:

- `direct`: the replica itself;
- `gateway`: the gateway with its default observability (metrics, access log to file);
- `gateway+records`: the same plus prediction records for 100% of calls to JSONL;
- `gateway-telemetry-off`: metrics off and access log off;
- `minimal-proxy`: bench/minimal_proxy.py, the floor of a Python `grpc.aio` proxy;
- `nginx`: nginx `grpc_pass` with an upstream keepalive pool (skipped when nginx is absent).

Beside the local cells, `multiplexed` cells call the default gateway's application
`multiplexed` (a local `MuxEcho` replica, `@gateway.multiplexed`) with a `multiplexed_model_id`
whose model is loaded: the cost of routing by model id and the cache lookup, compared with the
plain local gateway cell. Beside the external cells, `... (unknown method)` cells call the
same replica's Echo under a name the gateway cannot know (bench/unknown_cell.py, issue 17).

Each gateway variant is one `gateway run` process serving two applications, `local` and
`external`, so both kinds are measured through the same process. Every cell checks that every
call was a real gRPC OK, not only an HTTP 200 (see `run_cell`). Results: a markdown table on
stdout and in `bench/results/<timestamp>.md`, the raw figures in `<timestamp>.json`.

This module runs it all; the pieces: bench/procs.py (the processes), bench/load.py (h2load and
the verifying gRPC client), bench/cells.py (one measured and checked cell), bench/paired.py
(ABBA pairs), bench/unknown_cell.py, bench/http_cell.py, bench/report.py (ratios, markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.cells import FULL, SMOKE, Settings, Target, run_cell
from bench.echo_replica import ECHO_METHOD
from bench.frames import write_echo_frame
from bench.http_cell import run_http_cells
from bench.load import Clients, h2load
from bench.paired import Pair, Side, run_paired
from bench.procs import (
    GATEWAY_VARIANTS,
    KINDS,
    LOOP_VARIANT,
    MUX_KIND,
    ROOT,
    Child,
    GatewayProc,
    child_env,
    cpu_seconds,
    git_revision,
    nginx_binary,
    start_gateway,
    start_nginx,
    stopping,
    tool_version,
    wait_gateway,
)
from bench.report import OK_METHOD, add_ratios, gateway_features, render
from bench.unknown_cell import add_unknown_ratios, unknown_name, with_unknown_twins

RESULTS_DIR = ROOT / "bench" / "results"


def paired_pairs(targets: list[Target]) -> tuple[list[Pair], Pair | None]:
    """The pairs the targets compare (bench/paired.py), from this run's targets."""
    by = {(t.kind, t.name): t for t in targets}

    def side(kind: str, name: str) -> Side | None:
        t = by.get((kind, name))
        return None if t is None else Side(f"{kind} {name}", t.address, kind, t.proxy_pids,
                                           t.replica_pid, t.method)

    wanted = [
        ("external", "gateway", "minimal-proxy", "default vs minimal proxy", ">= 0.95"),
        ("external", "gateway", "gateway-telemetry-off", "telemetry on vs off", ">= 0.90"),
        ("local", "gateway", "gateway-telemetry-off", "telemetry on vs off", ">= 0.90"),
        ("local", "gateway", "direct", "default vs direct", ">= 0.55"),
        ("local", "gateway+records", "direct", "records 100% vs direct", ">= 0.45"),
        ("external", unknown_name("gateway"), "gateway", "unknown vs known method", ">= 0.85"),
    ]
    pairs = []
    for kind, a, b, name, want in wanted:
        sa, sb = side(kind, a), side(kind, b)
        if sa is not None and sb is not None:
            pairs.append(Pair(f"{kind}, {name}", sa, sb, want))
    ea, eb = side("external", "gateway"), side("external", "minimal-proxy")
    equal = (Pair("external, equal load", ea, eb, "CPU: gateway <= 1.10, replica <= 1.05")
             if ea is not None and eb is not None else None)
    return pairs, equal


def measure_memory(gw: GatewayProc, s: Settings, frame: Path, message: bytes, work: Path) -> (
    dict[str, Any]
):
    """Resident memory of a fresh gateway process after 50k and 250k calls at concurrency 16
    (calls to the local replica; the figures are taken once its access log has drained)."""
    points: list[dict[str, Any]] = []
    proc = psutil.Process(gw.child.pid)
    for target in s.memory_points:
        more = target - sum(gw.calls.values())
        if more > 0:
            r = h2load(gw.address, 16, frame, "local", work, calls=more)
            gw.calls["local"] += r.succeeded
            if r.succeeded != more or r.data_bytes != more * (5 + len(message)):
                return {"points": points, "pid": gw.child.pid,
                        "note": f"memory run: {r.succeeded}/{more} succeeded, "
                                f"{r.data_bytes} B of echo messages"}
        time.sleep(0.5)  # let the access log writer drain
        points.append({"calls": sum(gw.calls.values()),
                       "rss_mb": round(proc.memory_info().rss / 2**20, 2)})
    arize = any("arize" in m.path for m in proc.memory_maps()) if hasattr(proc, "memory_maps") \
        else False
    return {"points": points, "pid": gw.child.pid,
            "note": "arize native libraries mapped in the gateway" if arize else ""}


def run(s: Settings, out_dir: Path, keep: bool = False) -> dict[str, Any]:
    if shutil.which("h2load") is None:
        raise SystemExit("bench: h2load not found (Debian: apt-get install nghttp2-client)")
    started = datetime.datetime.now().astimezone()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    frame, message = write_echo_frame(tmp / "echo.frame")
    env = child_env()
    notes = [
        f"machine: {os.cpu_count()} cores shared by h2load, the proxy and the replica(s); "
        "figures are noisy, compare ratios within one run",
        f"load: h2load, 1 connection, concurrency = streams on it (-m); unary {ECHO_METHOD}, "
        f"{len(message)}-byte message; "
        + ("smoke: tiny fixed counts" if s.smoke else
           f"per cell {s.warmup_s:g}s warm-up, then ~{s.measure_s:g}s measured by call count"),
        "proxy CPU: utime+stime of the proxy process(es) over the measured run (gateway: the "
        "gateway process without its replicas; nginx: master and worker); 'vs replica CPU' "
        "divides it by the replica's CPU per call when called directly",
        f"commit {git_revision()}; grpcio {grpc.__version__}; Python {platform.python_version()};"
        f" {tool_version(['h2load', '--version'])}",
    ]
    children: list[Child] = []
    cells: list[dict[str, Any]] = []
    clients = Clients()
    features: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    paired: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with stopping(children):
        ext = Child("external replica", [sys.executable, "-m", "bench.echo_replica"],
                    tmp / "external-replica.log", env=env)
        children.append(ext)
        ext_addr = "127.0.0.1:" + ext.wait_for(r"listening (\d+)").group(1)
        gws = {v: start_gateway(v, tmp, ext_addr, env, multiplexed=v == "gateway")
               for v in GATEWAY_VARIANTS}
        # A fresh default gateway that serves only the memory run, so its first figure is
        # taken at 50k calls and not after whatever the cells sent.
        mem_gw = start_gateway("gateway", tmp, ext_addr, env, subdir="gateway-memory")
        loop_gw = start_gateway(LOOP_VARIANT, tmp, ext_addr, env)
        children.extend([*(g.child for g in gws.values()), mem_gw.child, loop_gw.child])
        for g in [*gws.values(), mem_gw, loop_gw]:
            wait_gateway(g)
        default = gws["gateway"]
        upstreams = {"local": default.local_replica_address, "external": ext_addr}
        minimal: dict[str, Child] = {}
        for kind, up in upstreams.items():
            c = Child(f"minimal proxy ({kind})",
                      [sys.executable, "-m", "bench.minimal_proxy", "--target", up],
                      tmp / f"minimal-{kind}.log", env=env)
            children.append(c)
            minimal[kind] = c
        # The same floor on uvloop (the gateway's default loop): paired with the gateway.
        min_uv = Child("minimal proxy (external, uvloop)",
                       [sys.executable, "-m", "bench.minimal_proxy", "--target", ext_addr,
                        "--loop", "uvloop"], tmp / "minimal-external-uvloop.log", env=env)
        children.append(min_uv)
        minimal_addr = {k: "127.0.0.1:" + c.wait_for(r"listening (\d+)").group(1)
                        for k, c in minimal.items()}
        min_uv_addr = "127.0.0.1:" + min_uv.wait_for(r"listening (\d+)").group(1)
        nginx_bin = nginx_binary()
        nginx: Child | None = None
        nginx_addr: dict[str, str] = {}
        if nginx_bin is None:
            notes.append("nginx not found: nginx cells skipped")
        else:
            nginx, nginx_addr = start_nginx(nginx_bin, tmp, upstreams)
            children.append(nginx)
            notes.append(f"{tool_version([nginx_bin, '-v'])}, 1 worker, upstream keepalive 256, "
                         "default (unbuffered) access log")

        def pids_of(pid: int, with_children: bool) -> Callable[[], list[int]]:
            def f() -> list[int]:
                if not with_children:
                    return [pid]
                with contextlib.suppress(psutil.NoSuchProcess):
                    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
                return [pid]
            return f

        targets: list[Target] = []
        for kind in KINDS:
            rep_addr = default.local_replica_address if kind == "local" else ext_addr
            rep_pid = default.local_replica_pid if kind == "local" else ext.pid
            targets.append(Target(kind, "direct", rep_addr, rep_addr, rep_pid, lambda: []))
            for v, g in gws.items():
                r_addr = g.local_replica_address if kind == "local" else ext_addr
                r_pid = g.local_replica_pid if kind == "local" else ext.pid
                targets.append(Target(kind, v, g.address, r_addr, r_pid,
                                      pids_of(g.child.pid, False), gateway=g))
            targets.append(Target(kind, "minimal-proxy", minimal_addr[kind], rep_addr, rep_pid,
                                  pids_of(minimal[kind].pid, False)))
            if nginx is not None:
                targets.append(Target(kind, "nginx", nginx_addr[kind], rep_addr, rep_pid,
                                      pids_of(nginx.pid, True),
                                      nginx_log=tmp / "nginx" / "access.log"))
        targets = with_unknown_twins(targets)  # issue 17: a method the gateway cannot know
        targets.append(Target(MUX_KIND, "gateway", default.address, default.mux_replica_address,
                              default.mux_replica_pid, pids_of(default.child.pid, False),
                              gateway=default))
        work = tmp / "work"
        work.mkdir()
        for kind in (*KINDS, MUX_KIND):
            for conc in s.concurrencies:
                for t in (t for t in targets if t.kind == kind):
                    cell = run_cell(t, conc, s, frame, message, clients, work)
                    cells.append(cell)
                    print(f"  {kind:8} {t.name:33} c={conc:<3} {cell['calls_per_s']:8.0f} calls/s"
                          f"  p50 {cell['p50_ms']:.3f} ms  ok={cell['grpc_ok']}",
                          file=sys.stderr, flush=True)
        time.sleep(0.3)  # the access logs write their last lines
        # Taken before the paired slices, which send calls the cells did not count.
        features = {v: gateway_features(g) for v, g in [*gws.items(), (LOOP_VARIANT, loop_gw)]}
        pairs, equal = paired_pairs(targets)
        gw_side = next((p.a for p in pairs if p.name == "external, default vs minimal proxy"),
                       None)
        uv_side = Side("external gateway (uvloop)", loop_gw.address, "external",
                       pids_of(loop_gw.child.pid, False), ext.pid)
        if gw_side is not None:
            pairs += [
                Pair("external, event loop uvloop vs asyncio", uv_side, gw_side, "information"),
                Pair("external, uvloop gateway vs minimal proxy on uvloop", uv_side,
                     Side("external minimal-proxy (uvloop)", min_uv_addr, "external",
                          pids_of(min_uv.pid, False), ext.pid), "information"),
            ]
        paired = run_paired(pairs, equal, h2load, cpu_seconds, frame, work, smoke=s.smoke)
        memory = measure_memory(mem_gw, s, frame, message, work)
        http_cells = run_http_cells(s, tmp, env)
        clients.close()
    add_ratios(cells)
    add_unknown_ratios(cells)
    result = {
        "started": started.isoformat(timespec="seconds"), "smoke": s.smoke,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "settings": {"concurrencies": list(s.concurrencies), "warmup_s": s.warmup_s,
                     "measure_s": s.measure_s, "verify_calls": s.verify_calls,
                     "memory_points": list(s.memory_points)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": os.getloadavg()},
        "notes": notes, "ok_method": OK_METHOD, "cells": cells, "memory": memory,
        "http": http_cells,
        "paired": paired,
        "features": features,
        "gateway_configs": {v: g.config for v, g in gws.items()},
        "nginx": nginx is not None,
        "processes": {f"{c.name} ({c.pid})": c.pid for c in children},
    }
    if keep:
        result["work_dir"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds, tiny counts")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for .md and .json")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir (logs, configs)")
    a = p.parse_args(argv)
    result = run(SMOKE if a.smoke else FULL, a.out, keep=a.keep)
    text = render(result)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = result["started"].replace(":", "").replace("-", "")[:15]
    stem = a.out / (stamp + ("-smoke" if a.smoke else ""))
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(text)
    print(f"written: {stem}.md, {stem}.json")
    ok = all(c["grpc_ok"] for c in result["cells"]) and all(
        c["ok"] for c in result["http"]["cells"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
