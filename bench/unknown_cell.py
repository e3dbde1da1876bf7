"""The unknown-method cell of `make bench` (issue 17): the gateway's path for a method it
cannot know, against its path for a method it knows, in the same run, same replica, same work.

The external echo replica serves its `Echo` also as `/bench.Unlisted/Echo` (bench/echo_replica.py):
same handler, same (de)serializers, but in no proto the gateway is given and not listed by the
replica's reflection. The gateway then forwards it as a bidi stream (the one shape that carries
every shape on the wire) instead of a unary call. The cells here are copies of the external
`direct`, `gateway` and `minimal-proxy` targets that call that name, measured by `run_cell` with
every check it makes; the replica's counter is the unlisted name's own (`/bench.Unlisted/Stats`),
the gateway's metrics are read under the method's own label (an unknown name keeps it once a
replica answered it, bounded), and for the gateway one more check: `gateway status` warns about
the external deployment naming the method, which only happens when the gateway treated it as
unknown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bench.cells import Target, find_cell, fmt, ratio
from bench.echo_replica import UNLISTED_ECHO_METHOD, UNLISTED_STATS_METHOD
from bench.procs import GatewayProc

KIND = "external"
SUFFIX = " (unknown method)"
COUNTERPARTS = ("direct", "gateway", "minimal-proxy")
"""Known-method targets that get an unknown-method twin (the minimal proxy is method-agnostic:
its twin shows what the name alone costs a plain pass-through)."""
SUMMARY_LABEL = "unknown-method / known-method (external, c16)"


def unknown_name(known: str) -> str:
    return known + SUFFIX


NAMES = tuple(unknown_name(n) for n in COUNTERPARTS)


def treated_as_unknown(gw: GatewayProc, app: str = KIND,
                       deployment: str = "Echo") -> Callable[[], tuple[bool, str]]:
    """A check: the gateway's status warns that `app` is called with a method it does not know,
    naming the unlisted method (set by the call path only for calls it forwarded as unknown)."""

    def check() -> tuple[bool, str]:
        from gateway.admin.client import status

        st = status(gw.admin_address, timeout=10)
        a = st.applications.get(app)
        d = a.deployments.get(deployment) if a is not None else None
        warning = d.warning if d is not None else ""
        if UNLISTED_ECHO_METHOD in warning and "does not know" in warning:
            return True, f"gateway status: {UNLISTED_ECHO_METHOD} is a method it does not know"
        return False, (f"gateway status does not name {UNLISTED_ECHO_METHOD} as unknown "
                       f"(warning: {warning[:200]!r})")

    return check


def with_unknown_twins(targets: list[Target]) -> list[Target]:
    """`targets` with, right after each of the external direct, default gateway and minimal
    proxy, its twin calling the unlisted method (measured next to it, same conditions)."""
    out = []
    for t in targets:
        out.append(t)
        if t.kind != KIND or t.name not in COUNTERPARTS:
            continue
        check = treated_as_unknown(t.gateway) if t.gateway is not None else None
        out.append(dataclasses.replace(t, name=unknown_name(t.name), method=UNLISTED_ECHO_METHOD,
                                       stats_method=UNLISTED_STATS_METHOD, check=check))
    return out


def add_unknown_ratios(cells: list[dict[str, Any]]) -> None:
    """Each unknown-method cell over its known-method counterpart (same concurrency)."""
    for c in cells:
        if c["kind"] != KIND or not c["target"].endswith(SUFFIX):
            continue
        known = find_cell(cells, KIND, c["target"].removesuffix(SUFFIX), c["concurrency"])
        if known is None:
            continue
        c["calls_per_s_vs_known"] = ratio(c["calls_per_s"], known["calls_per_s"])
        c["proxy_cpu_vs_known"] = ratio(c["proxy_cpu_us_per_call"],
                                         known["proxy_cpu_us_per_call"])
        c["replica_cpu_vs_known"] = ratio(c["replica_cpu_us_per_call"],
                                           known["replica_cpu_us_per_call"])
        c["p50_added_vs_known_ms"] = round(c["p50_ms"] - known["p50_ms"], 4)


def summary_line(cells: list[dict[str, Any]], conc: int = 16) -> str:
    """The targets-table row: the gateway's unknown-method throughput over its known one."""
    c = find_cell(cells, KIND, unknown_name("gateway"), conc)
    ratio = c.get("calls_per_s_vs_known") if c is not None else None
    return f"| {SUMMARY_LABEL} | >= 0.85 | {fmt(ratio, 3)} |"


def render_unknown(cells: list[dict[str, Any]], concurrencies: list[int]) -> list[str]:
    lines = ["", f"## Methods the gateway does not know (external replica, {UNLISTED_ECHO_METHOD})",
             "", "Same replica and handler as `/bench.Echo/Echo`; the gateway cannot learn this "
             "name (not in proto_modules, not listed by reflection) and forwards it as a bidi "
             "stream. Each row is set against the same target calling the known method.", "",
             "| target | conc | calls/s | vs known method | vs direct (known) | p50 ms | "
             "+p50 vs known ms | p99 ms | proxy CPU us/call | vs known | replica CPU us/call | "
             "vs known | gRPC OK |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for conc in concurrencies:
        for name in NAMES:
            c = find_cell(cells, KIND, name, conc)
            if c is None:
                continue
            lines.append(
                f"| {name} | {conc} | {c['calls_per_s']:.0f} | "
                f"{fmt(c.get('calls_per_s_vs_known'))} | "
                f"{fmt(c.get('calls_per_s_vs_direct'))} | {c['p50_ms']:.3f} | "
                f"{fmt(c.get('p50_added_vs_known_ms'), 3)} | {c['p99_ms']:.3f} | "
                f"{fmt(c['proxy_cpu_us_per_call'], 0)} | {fmt(c.get('proxy_cpu_vs_known'))} | "
                f"{fmt(c['replica_cpu_us_per_call'], 0)} | "
                f"{fmt(c.get('replica_cpu_vs_known'))} | "
                f"{'yes' if c['grpc_ok'] else 'NO: ' + '; '.join(c['problems'])} |")
    return lines
