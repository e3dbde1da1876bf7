"""Paired ratios: the figures a target compares, measured side by side, in alternation.

The main table measures each cell once, one after the other, so a ratio of two cells also
measures whatever the shared 2-core machine did between them (drift of 10-20% between two
runs a minute apart is common here). For the ratios the targets name, this module runs the
two targets of a pair in short alternating slices (A B, then B A, ...: an ABBA order, so a
steady drift cancels) at the same concurrency, and reports the median of the per-round ratios
with every round's figure beside it.

One more pair is run at an equal offered load (h2load `--rps`, below what either target can
take): CPU per call of the proxy and of the replica behind it, with the same calls per second
going through both. At saturation a slower proxy hands the replica fewer calls per wake-up, so
the replica's CPU per call rises with no change in what it is sent; at equal load it does not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.echo_replica import ECHO_METHOD

ROUNDS = 3
SLICE_S = 2.0
CONCURRENCY = 16
EQUAL_LOAD_SHARE = 0.6
"""The equal-load rate, as a share of the slower target's paired throughput."""


@dataclass
class Side:
    """One side of a pair: where to send calls and whose CPU to count."""

    label: str
    address: str
    app: str
    proxy_pids: Callable[[], list[int]]
    replica_pid: int
    path: str = ECHO_METHOD


@dataclass
class Pair:
    name: str
    a: Side
    b: Side
    wanted: str
    """The issue's target for a/b (text, shown beside the figure)."""


Load = Callable[..., Any]
"""bench.load.h2load (passed in, so tests can drive it with their own)."""
Cpu = Callable[[list[int]], float]


def _slice(side: Side, load: Load, cpu: Cpu, frame: Path, work: Path, seconds: float,
           rps: int | None = None, calls: int | None = None) -> dict[str, Any]:
    """One run of `calls` calls (or `seconds` long, for a warm-up: h2load cuts calls off at
    the end of a timed run, and a cut streaming call can look answered)."""
    pids = side.proxy_pids()
    p0, r0 = cpu(pids), cpu([side.replica_pid])
    res = load(side.address, CONCURRENCY, frame, side.app, work,
               duration_s=None if calls else seconds, calls=calls, path=side.path, rps=rps,
               log_name="paired.log")
    p1, r1 = cpu(pids), cpu([side.replica_pid])
    n = max(res.succeeded, 1)
    # HTTP 200 is not gRPC OK: every response must also carry the one echo message (a gRPC
    # error is trailers-only), as the main cells check.
    ok = (res.failed == 0 and res.errored == 0 and res.status_2xx == res.succeeded > 0
          and res.data_bytes == res.succeeded * frame.stat().st_size
          and (calls is None or res.succeeded == calls))
    return {"calls_per_s": res.calls_per_s, "calls": res.succeeded, "ok": ok,
            "proxy_cpu_us": (p1 - p0) / n * 1e6 if pids else None,
            "replica_cpu_us": (r1 - r0) / n * 1e6}


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), 3) if vals else None


def run_pair(pair: Pair, load: Load, cpu: Cpu, frame: Path, work: Path,
             rounds: int = ROUNDS, seconds: float = SLICE_S,
             rps: int | None = None) -> dict[str, Any]:
    """`rounds` rounds of one slice each side, ABBA order; the median of the round ratios."""
    count: dict[str, int] = {}
    for side in (pair.a, pair.b):
        # Warm both (connections, caches) outside the figures; the warm-up's rate sets the
        # call count of a slice of `seconds`.
        warm = _slice(side, load, cpu, frame, work, min(seconds, 1.0), rps)
        count[side.label] = max(CONCURRENCY * 4, int(warm["calls_per_s"] * seconds))
    a_runs: list[dict[str, Any]] = []
    b_runs: list[dict[str, Any]] = []
    for i in range(rounds):
        order = ((pair.a, a_runs), (pair.b, b_runs))
        for side, runs in (order if i % 2 == 0 else order[::-1]):
            runs.append(_slice(side, load, cpu, frame, work, seconds, rps, count[side.label]))

    def ratios(key: str) -> list[float | None]:
        out: list[float | None] = []
        for x, y in zip(a_runs, b_runs, strict=True):
            out.append(round(x[key] / y[key], 3) if x[key] is not None and y[key] else None)
        return out

    thr = ratios("calls_per_s")
    return {
        "name": pair.name, "a": pair.a.label, "b": pair.b.label, "wanted": pair.wanted,
        "rps": rps, "rounds": rounds, "slice_s": seconds,
        "ok": all(r["ok"] for r in a_runs + b_runs),
        "calls_per_s_ratio": _median(thr), "calls_per_s_ratios": thr,
        "a_calls_per_s": _median([r["calls_per_s"] for r in a_runs]),
        "b_calls_per_s": _median([r["calls_per_s"] for r in b_runs]),
        "proxy_cpu_ratio": _median(ratios("proxy_cpu_us")),
        "replica_cpu_ratio": _median(ratios("replica_cpu_us")),
        "a_proxy_cpu_us": _median([r["proxy_cpu_us"] for r in a_runs]),
        "b_proxy_cpu_us": _median([r["proxy_cpu_us"] for r in b_runs]),
        "a_replica_cpu_us": _median([r["replica_cpu_us"] for r in a_runs]),
        "b_replica_cpu_us": _median([r["replica_cpu_us"] for r in b_runs]),
    }


def run_paired(pairs: list[Pair], equal_load: Pair | None, load: Load, cpu: Cpu,
               frame: Path, work: Path, smoke: bool = False) -> list[dict[str, Any]]:
    """Every pair at saturation, then `equal_load` at a rate both sides can take."""
    rounds, seconds = (1, 0.5) if smoke else (ROUNDS, SLICE_S)
    out = [run_pair(p, load, cpu, frame, work, rounds, seconds) for p in pairs]
    if equal_load is not None:
        sat = next((r for r in out if r["a"] == equal_load.a.label
                    and r["b"] == equal_load.b.label), None)
        base = min(sat["a_calls_per_s"], sat["b_calls_per_s"]) if sat else 200.0
        rps = max(20, int(base * EQUAL_LOAD_SHARE))
        out.append(run_pair(equal_load, load, cpu, frame, work, rounds, seconds, rps=rps))
    return out


def render_paired(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Paired ratios (same run; the two targets in alternating slices, median of "
             "the rounds)", "",
             f"Each round: one slice of each target at c{CONCURRENCY}, ~{rows[0]['slice_s']:g} s "
             "(a call count set by a warm-up's rate), ABBA order. Ratios are a/b; CPU is per "
             "call, proxy process and replica process.",
             "",
             "| pair (a / b) | load | calls/s a/b | rounds | wanted | proxy CPU us a / b | "
             "proxy CPU a/b | replica CPU us a / b | replica CPU a/b | all gRPC OK |",
             "|---|---|---:|---|---|---|---:|---|---:|---|"]
    for r in rows:
        load = f"{r['rps']} calls/s each" if r["rps"] else "saturated"
        lines.append(
            f"| {r['name']}: {r['a']} / {r['b']} | {load} | {_f(r['calls_per_s_ratio'])} | "
            f"{', '.join(_f(x) for x in r['calls_per_s_ratios'])} | {r['wanted']} | "
            f"{_f(r['a_proxy_cpu_us'], 0)} / {_f(r['b_proxy_cpu_us'], 0)} | "
            f"{_f(r['proxy_cpu_ratio'])} | "
            f"{_f(r['a_replica_cpu_us'], 0)} / {_f(r['b_replica_cpu_us'], 0)} | "
            f"{_f(r['replica_cpu_ratio'])} | {'yes' if r['ok'] else 'NO'} |")
    return lines


def _f(v: float | None, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"
