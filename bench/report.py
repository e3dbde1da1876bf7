"""A run's figures as ratios (each over `direct`'s, same run) and as the markdown report."""

from __future__ import annotations

import re
from typing import Any

from bench.cells import access_log_lines, find_cell, fmt, ratio, records_written, scrape_statuses
from bench.http_cell import render_http
from bench.paired import render_paired
from bench.procs import KINDS, MUX_KIND, GatewayProc
from bench.unknown_cell import render_unknown, summary_line
from gateway.config import parse_config

TARGETS = ("direct", "gateway", "gateway+records", "gateway-telemetry-off", "minimal-proxy",
           "nginx")


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """Each figure over direct's from the same run (same kind and concurrency)."""
    direct = {(c["kind"], c["concurrency"]): c for c in cells if c["target"] == "direct"}
    for c in cells:
        d = direct.get((c["kind"], c["concurrency"]))
        if d is None:
            continue
        c["calls_per_s_vs_direct"] = ratio(c["calls_per_s"], d["calls_per_s"])
        c["p50_vs_direct"] = ratio(c["p50_ms"], d["p50_ms"])
        c["p99_vs_direct"] = ratio(c["p99_ms"], d["p99_ms"])
        c["p50_added_ms"] = round(c["p50_ms"] - d["p50_ms"], 4)
        # No proxy in `direct`: the proxy's CPU is set against what the replica itself spends.
        pc = c["proxy_cpu_us_per_call"]
        c["proxy_cpu_vs_direct_replica_cpu"] = (
            ratio(pc, d["replica_cpu_us_per_call"]) if pc is not None else None)
    # Multiplexing on, beside the same gateway's plain local cell.
    for c in cells:
        if c["kind"] == MUX_KIND:
            plain = find_cell(cells, "local", "gateway", c["concurrency"])
            if plain is not None:
                c["calls_per_s_vs_local_gateway"] = ratio(c["calls_per_s"],
                                                           plain["calls_per_s"])
                c["proxy_cpu_us_vs_local_gateway"] = ratio(c["proxy_cpu_us_per_call"],
                                                            plain["proxy_cpu_us_per_call"])


def targets_summary(cells: list[dict[str, Any]], memory: dict[str, Any]) -> list[str]:
    """Issue 6's targets beside what this run measured (no pass/fail: 2 shared cores)."""
    out = []

    def get(kind: str, target: str, conc: int, key: str) -> Any:
        c = find_cell(cells, kind, target, conc)
        return None if c is None else c.get(key)

    def ratio_of(kind: str, a: str, b: str, conc: int = 16) -> float | None:
        x, y = get(kind, a, conc, "calls_per_s"), get(kind, b, conc, "calls_per_s")
        return ratio(x, y)

    out.append(f"| local, default observability, c16, throughput vs direct | >= 0.55 | "
               f"{fmt(get('local', 'gateway', 16, 'calls_per_s_vs_direct'), 3)} |")
    out.append(f"| local, gateway CPU per call, c16 | ~300 us | "
               f"{fmt(get('local', 'gateway', 16, 'proxy_cpu_us_per_call'), 0)} us |")
    out.append(f"| external, default observability vs minimal proxy, c16 | >= 0.95 | "
               f"{fmt(ratio_of('external', 'gateway', 'minimal-proxy'), 3)} |")
    out.append(f"| external, nginx vs direct, c16 (reference) | - | "
               f"{fmt(get('external', 'nginx', 16, 'calls_per_s_vs_direct'), 3)} |")
    out.append(f"| local, added p50 at c1 | <= 0.35 ms | "
               f"{fmt(get('local', 'gateway', 1, 'p50_added_ms'), 3)} ms |")
    out.append(f"| local, records 100% to JSONL, c16, vs direct | >= 0.45 | "
               f"{fmt(get('local', 'gateway+records', 16, 'calls_per_s_vs_direct'), 3)} |")
    for kind in KINDS:
        out.append(f"| {kind}, telemetry on vs off, c16 | >= 0.90 | "
                   f"{fmt(ratio_of(kind, 'gateway', 'gateway-telemetry-off'), 3)} |")
    out.append(summary_line(cells))  # issue 17
    pts = memory.get("points", [])
    if len(pts) == 2:
        growth = (pts[1]["rss_mb"] - pts[0]["rss_mb"]) / pts[0]["rss_mb"]
        out.append(f"| memory growth {pts[0]['calls']} -> {pts[1]['calls']} calls | <= 5% | "
                   f"{growth * 100:.1f}% |")
        out.append(f"| resident memory after {pts[1]['calls']} calls | < 80 MB | "
                   f"{pts[1]['rss_mb']:.1f} MB |")
    return ["| target (issue 6) | wanted | measured |", "|---|---|---|", *out]


def render(result: dict[str, Any]) -> str:
    cells = result["cells"]
    lines = [f"# Benchmark {result['started']} ({'smoke' if result['smoke'] else 'full'})", ""]
    lines += [f"- {n}" for n in result["notes"]]
    for kind in KINDS:
        title = ("local replica (started by the gateway from import_path)" if kind == "local"
                 else "external replica (`targets`, a plain grpc.aio process)")
        lines += ["", f"## {title}", "",
                  "| target | conc | calls/s | vs direct | p50 ms | +p50 ms | p99 ms | "
                  "vs direct | proxy CPU us/call | vs replica CPU | replica CPU us/call | "
                  "gRPC OK |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for conc in result["settings"]["concurrencies"]:
            for name in TARGETS:
                c = find_cell(cells, kind, name, conc)
                if c is None:
                    continue
                lines.append(
                    f"| {name} | {conc} | {c['calls_per_s']:.0f} | "
                    f"{fmt(c.get('calls_per_s_vs_direct'))} | {c['p50_ms']:.3f} | "
                    f"{fmt(c.get('p50_added_ms'), 3)} | {c['p99_ms']:.3f} | "
                    f"{fmt(c.get('p99_vs_direct'))} | {fmt(c['proxy_cpu_us_per_call'], 0)} | "
                    f"{fmt(c.get('proxy_cpu_vs_direct_replica_cpu'))} | "
                    f"{fmt(c['replica_cpu_us_per_call'], 0)} | "
                    f"{'yes' if c['grpc_ok'] else 'NO: ' + '; '.join(c['problems'])} |")
    lines += ["", "## multiplexed models (local replica, calls for a loaded model)", "",
              "| target | conc | calls/s | vs plain local gateway | p50 ms | p99 ms | "
              "proxy CPU us/call | vs plain local gateway | gRPC OK |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for conc in result["settings"]["concurrencies"]:
        c = find_cell(cells, MUX_KIND, "gateway", conc)
        if c is not None:
            lines.append(
                f"| gateway | {conc} | {c['calls_per_s']:.0f} | "
                f"{fmt(c.get('calls_per_s_vs_local_gateway'))} | {c['p50_ms']:.3f} | "
                f"{c['p99_ms']:.3f} | {fmt(c['proxy_cpu_us_per_call'], 0)} | "
                f"{fmt(c.get('proxy_cpu_us_vs_local_gateway'))} | "
                f"{'yes' if c['grpc_ok'] else 'NO: ' + '; '.join(c['problems'])} |")
    lines += render_unknown(cells, result["settings"]["concurrencies"])
    mem = result["memory"]
    lines += ["", "## Gateway memory (default observability, local replica calls)", ""]
    for p in mem.get("points", []):
        lines.append(f"- after {p['calls']} calls: {p['rss_mb']:.1f} MB resident")
    if mem.get("note"):
        lines.append(f"- {mem['note']}")
    lines += ["", "## Features active per gateway variant", ""]
    for v, f in result["features"].items():
        lines.append(f"- {v}: " + ", ".join(f"{k}={val}" for k, val in f.items()))
    if result.get("http"):
        lines += render_http(result["http"])
    lines += render_paired(result.get("paired", []))
    lines += ["", "## Issue 6 targets (same run)", "", *targets_summary(cells, mem), ""]
    lines += ["How each call is checked to be gRPC OK: " + result["ok_method"], ""]
    return "\n".join(lines)


OK_METHOD = (
    "h2load sees only HTTP status, so each cell adds: (1) a few calls with a Python gRPC client "
    "through the same target, same bytes and metadata, that read grpc-status from the trailers "
    "and compare the echo; (2) every measured response carried exactly one echo message (h2load's "
    "DATA byte count; a gRPC error is trailers-only); (3) the replica's own counter (Echo/Stats; "
    "Unlisted/Stats for the unknown-method cells) rose by exactly the measured call count; (4) "
    "for gateways with metrics on, the gateway's ray_serve_num_grpc_requests rose by exactly that "
    "count, all with status_code OK (under the called method's label); (5) for nginx, its access "
    "log records the grpc-status trailer it sent ('$sent_trailer_grpc_status'), one '200 0' line "
    "per call; (6) for the gateway's unknown-method cells, `gateway status` names the method as "
    "one it does not know.")


def gateway_features(gw: GatewayProc) -> dict[str, Any]:
    """What actually ran in this gateway variant (features other work may not have built yet)."""
    cfg = parse_config(gw.config)
    sent = sum(gw.calls.values())
    f: dict[str, Any] = {
        "metrics": "off" if not cfg.metrics.enabled else (
            "on" if gw.metrics_port and _scrape_ok(gw.metrics_port) else "configured, no endpoint"),
        "access_log": "off (disabled)" if cfg.logging_config.disable_access_log else
        f"{access_log_lines(gw.logs_dir)} lines for {sent} calls",
        "local_transport": getattr(cfg.proxy, "local_transport", "grpc"),
        "event_loop": _event_loop(gw),
    }
    if gw.records_path is not None:
        n = records_written(gw.records_path)
        f["prediction_records"] = (f"{n} records for {sent} calls" if n
                                   else "configured but none written (feature not active)")
    return f


def _event_loop(gw: GatewayProc) -> str:
    """The loop the gateway's start-up lines name (what ran, not what was configured)."""
    m = re.search(r"gateway: event loop (\w+)", gw.child.out.read_text(errors="replace"))
    return m.group(1) if m else "not reported"


def _scrape_ok(port: int) -> bool:
    try:
        scrape_statuses(port, "local")
        return True
    except OSError:
        return False
