"""One measured cell: a target (direct, a gateway variant, the minimal proxy, nginx) at one
concurrency, verified, warmed up, measured, and checked call by call (`run_cell`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.echo_replica import ECHO_METHOD, STATS_METHOD, UNLISTED_ECHO_METHOD
from bench.load import Clients, h2load, percentile
from bench.procs import MUX_KIND, MUX_MODEL, GatewayProc, children_cpu_seconds, cpu_seconds


@dataclass(frozen=True)
class Settings:
    smoke: bool
    concurrencies: tuple[int, ...] = (1, 16, 64)
    warmup_s: float = 1.0
    """Timed warm-up per cell (full run); it also calibrates the measured call count."""
    measure_s: float = 4.0
    """Target duration of a measured run (full run)."""
    warmup_calls: int = 0
    """Smoke: a fixed warm-up count instead of a timed warm-up."""
    measure_calls: int = 0
    """Smoke: a fixed measured count instead of one derived from `measure_s`."""
    verify_calls: int = 20
    """Calls per cell made with a Python gRPC client that reads the status from the trailers."""
    memory_points: tuple[int, int] = (50_000, 250_000)


FULL = Settings(smoke=False)
SMOKE = Settings(smoke=True, warmup_s=0.0, measure_s=0.0, warmup_calls=30, measure_calls=150,
                 verify_calls=3, memory_points=(1_000, 2_500))


# -- child processes ---------------------------------------------------------------------


@dataclass
class Target:
    kind: str
    name: str
    address: str
    replica_address: str
    replica_pid: int
    proxy_pids: Callable[[], list[int]]
    gateway: GatewayProc | None = None
    nginx_log: Path | None = None
    method: str = ECHO_METHOD
    """The method called (bench/unknown_cell.py: one the gateway cannot know)."""
    stats_method: str = STATS_METHOD
    """The replica's count of the calls it served to `method`."""
    check: Callable[[], tuple[bool, str]] | None = None
    """One more check after the measured run: (passed, what it found)."""



def scrape_statuses(port: int, app: str, method: str = ECHO_METHOD) -> dict[str, float]:
    """The gateway's own count of finished calls of `app` to `method` per gRPC status
    (Prometheus; an unknown method keeps its own name as its label once a replica answered)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("ray_serve_num_grpc_requests", "ray_serve_num_grpc_requests_total"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            if s.labels.get("application") == app and s.labels.get("method") == method:
                code = s.labels.get("status_code", "?")
                out[code] = out.get(code, 0.0) + s.value
    return out


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return data.decode(errors="replace").splitlines(), offset + len(data)


def access_log_lines(logs_dir: Path) -> int:
    """Access lines for Echo (either name) in the gateway's own log files (not the replicas')."""
    n = 0
    # Access lines only: a warning may name a method too (the unknown-method one does).
    names = tuple(f" access - {m} ".encode() for m in (ECHO_METHOD, UNLISTED_ECHO_METHOD))
    for p in logs_dir.glob("*.log*"):
        if p.name.startswith("replica_"):
            continue
        with p.open("rb") as f:
            n += sum(1 for line in f if any(m in line for m in names))
    return n


_NON_OK = re.compile(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|"
                     r"RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|UNIMPLEMENTED|INTERNAL|"
                     r"UNAVAILABLE|DATA_LOSS|WARNING|ERROR)\b")


def log_size(logs_dir: Path) -> int:
    p = logs_dir / "gateway.log"
    return p.stat().st_size if p.exists() else 0


def gateway_error_lines(logs_dir: Path, offset: int, limit: int = 3) -> list[str]:
    """A few warning/error lines the gateway logged since `offset` (to say why a cell failed)."""
    lines, _ = read_new_lines(logs_dir / "gateway.log", offset)
    bad = [ln.strip() for ln in lines if _NON_OK.search(ln)]
    return [ln[:300] for ln in bad[:limit]]


def records_written(path: Path | None) -> int:
    """Prediction records in the JSONL file (and any JSONL file beside it)."""
    if path is None:
        return 0
    n = 0
    for p in path.parent.rglob("*.jsonl"):
        with p.open("rb") as f:
            n += sum(1 for _ in f)
    return n


def run_cell(t: Target, conc: int, s: Settings, frame: Path, message: bytes, clients: Clients,
             work: Path) -> dict[str, Any]:
    """Verify, warm up, then measure one (target, concurrency) cell and check every call."""
    app = t.kind
    mid = MUX_MODEL if app == MUX_KIND else None  # the verification calls load it
    problems: list[str] = []
    checks: list[str] = []
    log_off = log_size(t.gateway.logs_dir) if t.gateway is not None else 0
    bad = clients.verify(t.address, app, message, s.verify_calls, mid, t.method)
    if bad:
        problems.append(bad)
    else:
        checks.append(f"{s.verify_calls} Python gRPC calls: status OK, echo intact")
    if s.smoke:
        warm = h2load(t.address, conc, frame, app, work, calls=max(s.warmup_calls, conc * 2),
                      path=t.method, model_id=mid)
    else:
        warm = h2load(t.address, conc, frame, app, work, duration_s=s.warmup_s, path=t.method,
                      model_id=mid)
    n = (s.measure_calls if s.smoke
         else int(min(400_000, max(conc * 50, 500, warm.calls_per_s * s.measure_s))))
    n = max(n, conc * 4)
    if not s.smoke:
        time.sleep(0.1)  # calls the timed warm-up cut off finish before counters are read
    metrics0 = (scrape_statuses(t.gateway.metrics_port, app, t.method)
                if t.gateway and t.gateway.metrics_port else None)
    nginx_off = t.nginx_log.stat().st_size if t.nginx_log and t.nginx_log.exists() else 0
    served0 = clients.replica_calls(t.replica_address, t.stats_method)
    proxy_pids = t.proxy_pids()
    cpu_p0, cpu_r0, cpu_l0 = cpu_seconds(proxy_pids), cpu_seconds([t.replica_pid]), \
        children_cpu_seconds()
    res = h2load(t.address, conc, frame, app, work, calls=n, path=t.method, model_id=mid)
    cpu_p1, cpu_r1, cpu_l1 = cpu_seconds(proxy_pids), cpu_seconds([t.replica_pid]), \
        children_cpu_seconds()
    served = clients.replica_calls(t.replica_address, t.stats_method) - served0
    if t.gateway is not None:
        sent = s.verify_calls + warm.succeeded + res.succeeded
        t.gateway.calls[app] = t.gateway.calls.get(app, 0) + sent

    # Every call a real gRPC OK: h2load only sees HTTP 200, so each of these must also hold.
    frame_len = 5 + len(message)
    if res.succeeded != n or res.status_2xx != n or res.failed or res.errored:
        problems.append(f"h2load: {res.succeeded}/{n} succeeded, {res.status_2xx} 2xx, "
                        f"{res.failed} failed, {res.errored} errored")
    if res.data_bytes != n * frame_len:
        problems.append(f"response DATA {res.data_bytes} B, expected {n} x {frame_len} B "
                        "(a gRPC error is trailers-only, without a message)")
    else:
        checks.append(f"{n} responses each carried one {frame_len}-byte echo message")
    if served != n:
        problems.append(f"the replica served {served} {t.method} calls for {n} sent")
    else:
        checks.append(f"the replica served exactly {n} calls" + (
            f" of {t.method}" if t.method != ECHO_METHOD else ""))
    if metrics0 is not None and t.gateway and t.gateway.metrics_port:
        time.sleep(0.05)
        m1 = scrape_statuses(t.gateway.metrics_port, app, t.method)
        delta = {k: m1.get(k, 0.0) - metrics0.get(k, 0.0) for k in set(m1) | set(metrics0)}
        delta = {k: v for k, v in delta.items() if v}
        if delta != {"OK": float(n)}:
            problems.append(f"gateway metrics: status counts {delta}, expected {{'OK': {n}}}")
        else:
            checks.append(f"gateway metrics: {n} x status OK, no other status"
                          + (f', method="{t.method}"' if t.method != ECHO_METHOD else ""))
    if t.nginx_log is not None:
        lines, _ = read_new_lines(t.nginx_log, nginx_off)
        ok_lines = sum(1 for ln in lines if ln.strip() == "200 0")
        if ok_lines != n or len(lines) != n:
            problems.append(f"nginx log: {ok_lines} of {len(lines)} lines '200 0', {n} calls")
        else:
            checks.append(f"nginx access log: {n} x grpc-status 0 in trailers")
    if t.check is not None:
        passed, found = t.check()
        (checks if passed else problems).append(found)
    if problems and t.gateway is not None:
        problems += [f"gateway log: {ln}" for ln in gateway_error_lines(t.gateway.logs_dir,
                                                                        log_off)]
    lat = res.latencies_us
    proxy_cpu = (cpu_p1 - cpu_p0) / n * 1e6 if proxy_pids else None
    return {
        "kind": t.kind, "target": t.name, "concurrency": conc, "calls": n,
        "seconds": round(res.seconds, 4), "calls_per_s": round(res.calls_per_s, 1),
        "p50_ms": round(percentile(lat, 0.50), 4), "p99_ms": round(percentile(lat, 0.99), 4),
        "latency_samples": len(lat),
        "proxy_cpu_us_per_call": round(proxy_cpu, 1) if proxy_cpu is not None else None,
        "replica_cpu_us_per_call": round((cpu_r1 - cpu_r0) / n * 1e6, 1),
        "loadgen_cpu_us_per_call": round((cpu_l1 - cpu_l0) / n * 1e6, 1),
        "warmup_calls": warm.succeeded, "grpc_ok": not problems, "checks": checks,
        "problems": problems,
    }


# -- the run -----------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def find_cell(cells: list[dict[str, Any]], kind: str, target: str, conc: int) -> (
    dict[str, Any] | None
):
    return next((c for c in cells if c["kind"] == kind and c["target"] == target
                 and c["concurrency"] == conc), None)
