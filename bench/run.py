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
call was a real gRPC OK, not only an HTTP 200 (see `check_cell`). Results: a markdown table on
stdout and in `bench/results/<timestamp>.md`, the raw figures in `<timestamp>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml

from bench.echo_replica import ECHO_METHOD, STATS_METHOD, UNLISTED_ECHO_METHOD
from bench.frames import write_echo_frame
from bench.paired import Pair, Side, render_paired, run_paired
from gateway.config import parse_config
from gateway.pb import bench_pb2

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
NGINX_TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"
KINDS = ("local", "external")
TARGETS = ("direct", "gateway", "gateway+records", "gateway-telemetry-off", "minimal-proxy",
           "nginx")
GATEWAY_VARIANTS = ("gateway", "gateway+records", "gateway-telemetry-off")
MUX_KIND = "multiplexed"
"""Application (and cell kind) with model multiplexing on, in the default gateway only."""
MUX_MODEL = "bench-model"
START_TIMEOUT_S = 60.0


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


class Child:
    """A process this script started, its output in a file, stopped by its own pid only."""

    def __init__(self, name: str, cmd: list[str], out: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.out = out
        self._fh = out.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        """Wait until the output matches `pattern`; fail with the output if the child dies."""
        rx = re.compile(pattern, re.M)
        end = time.monotonic() + timeout
        while True:
            text = self.out.read_text(errors="replace")
            m = rx.search(text)
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > end:
                why = "exited" if self.proc.poll() is not None else "timed out"
                raise RuntimeError(f"{self.name} {why} before ready; output:\n{text[-3000:]}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of `pids` (all their threads), from /proc/<pid>/stat via psutil."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def children_cpu_seconds() -> float:
    """CPU of this script's waited-for children: h2load, the load generator."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- the processes under test ------------------------------------------------------------


@dataclass
class GatewayProc:
    variant: str
    child: Child
    address: str
    admin_address: str
    metrics_port: int | None
    logs_dir: Path
    records_path: Path | None
    config: dict[str, Any]
    local_replica_address: str = ""
    local_replica_pid: int = 0
    mux_replica_address: str = ""
    mux_replica_pid: int = 0
    calls: dict[str, int] = field(default_factory=lambda: {"local": 0, "external": 0})
    """Calls sent through this gateway per application (for the memory figures)."""


def gateway_config_data(variant: str, tmp: Path, external: str,
                        multiplexed: bool = False) -> dict[str, Any]:
    """The goal state of one gateway variant, validated through `gateway.config`."""
    deployment = {"name": "Echo", "num_replicas": 1,
                  # The benchmark measures the proxy, not admission control.
                  "max_ongoing_requests": 256, "max_queued_requests": 1000}
    apps: list[dict[str, Any]] = [
        {"name": "local",
         "deployments": [{**deployment, "import_path": "bench.echo_replica:Echo"}]},
        {"name": "external", "deployments": [{**deployment, "targets": [external]}]},
    ]
    if multiplexed:
        apps.append({"name": MUX_KIND, "deployments": [
            {**deployment, "import_path": "bench.echo_replica:MuxEcho"}]})
    data: dict[str, Any] = {
        "proxy": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "metrics": {"prometheus": {"host": "127.0.0.1", "port": free_port()}},
        "logging_config": {"logs_dir": str(tmp / "logs")},
        "proto_modules": ["gateway.pb.bench_pb2"],
        "applications": apps,
    }
    if variant == "gateway+records":
        for app in apps:
            # Echo is not the Open Inference Protocol: map its fields, or nothing is recorded.
            app["prediction_records"] = {
                "enabled": True, "sample_rate": 1.0, "model_name": "echo",
                "field_mapping": {"features": ["payload"], "prediction_label": "payload"},
            }
        data["records"] = {"jsonl_path": str(tmp / "records.jsonl")}
    elif variant == "gateway-telemetry-off":
        data["metrics"]["enabled"] = False
        data["logging_config"]["disable_access_log"] = True
    parse_config(data, source=f"bench config {variant}")  # fail here, not in the child
    return data


def start_gateway(variant: str, tmp: Path, external: str, env: dict[str, str],
                  subdir: str | None = None, multiplexed: bool = False) -> GatewayProc:
    d = tmp / (subdir or variant.replace("+", "-"))
    d.mkdir()
    data = gateway_config_data(variant, d, external, multiplexed)
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    child = Child(variant, [sys.executable, "-m", "gateway.cli", "run", str(path)],
                  d / "output.log", env=env)
    metrics = data["metrics"]
    return GatewayProc(
        variant=variant, child=child, address="", admin_address="",
        metrics_port=metrics["prometheus"]["port"] if metrics.get("enabled", True) else None,
        logs_dir=d / "logs",
        records_path=d / "records.jsonl" if variant == "gateway+records" else None,
        config=data,
    )


def wait_gateway(gw: GatewayProc) -> None:
    m = gw.child.wait_for(r"serving gRPC on (\S+)")
    gw.address = m.group(1)
    gw.admin_address = gw.child.wait_for(r"admin service on (\S+)").group(1)
    from gateway.admin.client import status

    st = status(gw.admin_address, timeout=10)
    for app in KINDS:
        a = st.applications.get(app)
        if a is None or a.status != "RUNNING":
            raise RuntimeError(f"{gw.variant}: application {app!r} is not RUNNING: {a}")
    reps = st.applications["local"].deployments["Echo"].replicas
    running = [r for r in reps if r.state == "RUNNING"]
    if not running:
        raise RuntimeError(f"{gw.variant}: no running local replica: {reps}")
    gw.local_replica_address, gw.local_replica_pid = running[0].address, running[0].pid
    mux = st.applications.get(MUX_KIND)
    if mux is not None:
        reps = [r for r in mux.deployments["Echo"].replicas if r.state == "RUNNING"]
        if mux.status != "RUNNING" or not reps:
            raise RuntimeError(f"{gw.variant}: application {MUX_KIND!r} is not RUNNING: {mux}")
        gw.mux_replica_address, gw.mux_replica_pid = reps[0].address, reps[0].pid


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def start_nginx(binary: str, tmp: Path, upstreams: dict[str, str]) -> tuple[Child, dict[str, str]]:
    """nginx with one loopback server per upstream; returns the child and kind -> address."""
    d = tmp / "nginx"
    d.mkdir()
    servers, addresses = [], {}
    for kind, upstream in upstreams.items():
        port = free_port()
        addresses[kind] = f"127.0.0.1:{port}"
        servers.append(
            f"    upstream replica_{kind} {{\n"
            f"        server {upstream};\n"
            f"        keepalive 256;\n"
            f"        keepalive_requests 100000000;\n"
            f"    }}\n"
            f"    server {{\n"
            f"        listen 127.0.0.1:{port} http2;\n"
            f"        location / {{ grpc_pass grpc://replica_{kind}; }}\n"
            f"    }}\n")
    conf = NGINX_TEMPLATE.read_text().replace("{{DIR}}", str(d))
    conf = conf.replace("{{SERVERS}}", "\n".join(servers))
    (d / "nginx.conf").write_text(conf)
    child = Child("nginx", [binary, "-p", str(d), "-c", str(d / "nginx.conf"),
                            "-e", str(d / "error.log")], d / "output.log")
    for addr in addresses.values():
        wait_port(addr, child)
    return child, addresses


def wait_port(address: str, child: Child, timeout: float = 15.0) -> None:
    host, port = address.rsplit(":", 1)
    end = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        if child.proc.poll() is not None or time.monotonic() > end:
            err = (child.out.parent / "error.log")
            extra = err.read_text() if err.exists() else child.out.read_text()
            raise RuntimeError(f"{child.name} did not listen on {address}:\n{extra[-2000:]}")
        time.sleep(0.05)


# -- one measured cell -------------------------------------------------------------------


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


@dataclass
class H2Result:
    calls: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    data_bytes: int
    seconds: float
    calls_per_s: float
    latencies_us: list[int]


def h2load(address: str, concurrency: int, frame: Path, app: str, work: Path,
           calls: int | None = None, duration_s: float | None = None,
           path: str = ECHO_METHOD, h1_json: bool = False, log_name: str = "h2load.log",
           model_id: str | None = None, rps: int | None = None) -> H2Result:
    """One h2load run over one connection with `concurrency` streams; `h1_json`: HTTP/1.1
    JSON posts over `concurrency` connections instead (the HTTP ingress cell)."""
    log = work / log_name
    log.unlink(missing_ok=True)
    if h1_json:
        cmd = ["h2load", "--h1", "-c", str(concurrency), "-t", "1", "-d", str(frame),
               "-H", "content-type: application/json", "-H", f"application: {app}",
               f"--log-file={log}"]
    else:
        cmd = ["h2load", "-c", "1", "-t", "1", "-m", str(concurrency), "-d", str(frame),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               "-H", f"application: {app}", f"--log-file={log}"]
        if model_id is not None:
            cmd += ["-H", f"multiplexed_model_id: {model_id}"]
        if rps is not None:
            cmd += ["--rps", str(rps)]  # a fixed offered load (bench/paired.py)
    if duration_s is not None:
        cmd += ["-D", f"{round(duration_s * 1000)}ms"]
        timeout = duration_s + 30
    else:
        assert calls is not None
        cmd += ["-n", str(calls)]
        timeout = 60 + calls / 200  # generous even at 200 calls/s
    cmd.append(f"http://{address}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    text = out.stdout
    fin = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", text)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored", text)
    st = re.search(r"status codes: (\d+) 2xx", text)
    data = re.search(r"\((\d+)\) data", text)
    if out.returncode != 0 or not (fin and req and st and data):
        raise RuntimeError(f"h2load failed ({out.returncode}): {' '.join(cmd)}\n"
                           f"{text}\n{out.stderr}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[fin.group(2)]
    lat = []
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "200":
                lat.append(int(parts[2]))
    lat.sort()
    return H2Result(
        calls=int(req.group(3)), succeeded=int(req.group(4)), failed=int(req.group(5)),
        errored=int(req.group(6)), status_2xx=int(st.group(1)), data_bytes=int(data.group(1)),
        seconds=float(fin.group(1)) * scale, calls_per_s=float(fin.group(3)), latencies_us=lat,
    )


def percentile(sorted_us: list[int], q: float) -> float:
    """Nearest-rank percentile in ms."""
    if not sorted_us:
        return float("nan")
    i = min(len(sorted_us) - 1, max(0, math.ceil(q * len(sorted_us)) - 1))
    return sorted_us[i] / 1000.0


class Clients:
    """Python gRPC channels (one per address) for the verification calls and replica stats."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str) -> grpc.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.insecure_channel(address)
        return ch

    def replica_calls(self, address: str, stats_method: str = STATS_METHOD) -> int:
        stats = self.channel(address).unary_unary(
            stats_method, request_serializer=bench_pb2.StatsRequest.SerializeToString,
            response_deserializer=bench_pb2.StatsReply.FromString)
        calls: int = stats(bench_pb2.StatsRequest(), timeout=10).calls
        return calls

    def verify(self, address: str, app: str, message: bytes, n: int,
               model_id: str | None = None, method: str = ECHO_METHOD) -> str | None:
        """`n` calls through `address` with the benchmark's request; None when each one came
        back with grpc-status OK and the echoed message, else what was wrong."""
        rpc = self.channel(address).unary_unary(method, None, None)
        md: tuple[tuple[str, str], ...] = (("application", app),)
        if model_id is not None:
            md += (("multiplexed_model_id", model_id),)
        for _ in range(n):
            try:
                resp, call = rpc.with_call(message, metadata=md, timeout=10)
            except grpc.RpcError as e:
                return f"verification call failed: {e.code().name}: {e.details()}"  # type: ignore[attr-defined]
            if call.code() is not grpc.StatusCode.OK or resp != message:
                return f"verification call: status {call.code()}, response {resp[:40]!r}"
        return None

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


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


def paired_pairs(targets: list[Target]) -> tuple[list[Pair], Pair | None]:
    """The pairs the targets compare (bench/paired.py), from this run's targets."""
    from bench.unknown_cell import unknown_name  # imports this module: not at the top

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


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """Each figure over direct's from the same run (same kind and concurrency)."""
    direct = {(c["kind"], c["concurrency"]): c for c in cells if c["target"] == "direct"}
    for c in cells:
        d = direct.get((c["kind"], c["concurrency"]))
        if d is None:
            continue
        c["calls_per_s_vs_direct"] = _ratio(c["calls_per_s"], d["calls_per_s"])
        c["p50_vs_direct"] = _ratio(c["p50_ms"], d["p50_ms"])
        c["p99_vs_direct"] = _ratio(c["p99_ms"], d["p99_ms"])
        c["p50_added_ms"] = round(c["p50_ms"] - d["p50_ms"], 4)
        # No proxy in `direct`: the proxy's CPU is set against what the replica itself spends.
        pc = c["proxy_cpu_us_per_call"]
        c["proxy_cpu_vs_direct_replica_cpu"] = (
            _ratio(pc, d["replica_cpu_us_per_call"]) if pc is not None else None)
    # Multiplexing on, beside the same gateway's plain local cell.
    for c in cells:
        if c["kind"] == MUX_KIND:
            plain = find_cell(cells, "local", "gateway", c["concurrency"])
            if plain is not None:
                c["calls_per_s_vs_local_gateway"] = _ratio(c["calls_per_s"],
                                                           plain["calls_per_s"])
                c["proxy_cpu_us_vs_local_gateway"] = _ratio(c["proxy_cpu_us_per_call"],
                                                            plain["proxy_cpu_us_per_call"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def _fmt(v: Any, nd: int = 2) -> str:
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


def targets_summary(cells: list[dict[str, Any]], memory: dict[str, Any]) -> list[str]:
    """Issue 6's targets beside what this run measured (no pass/fail: 2 shared cores)."""
    out = []

    def get(kind: str, target: str, conc: int, key: str) -> Any:
        c = find_cell(cells, kind, target, conc)
        return None if c is None else c.get(key)

    def ratio_of(kind: str, a: str, b: str, conc: int = 16) -> float | None:
        x, y = get(kind, a, conc, "calls_per_s"), get(kind, b, conc, "calls_per_s")
        return _ratio(x, y)

    out.append(f"| local, default observability, c16, throughput vs direct | >= 0.55 | "
               f"{_fmt(get('local', 'gateway', 16, 'calls_per_s_vs_direct'), 3)} |")
    out.append(f"| local, gateway CPU per call, c16 | ~300 us | "
               f"{_fmt(get('local', 'gateway', 16, 'proxy_cpu_us_per_call'), 0)} us |")
    out.append(f"| external, default observability vs minimal proxy, c16 | >= 0.95 | "
               f"{_fmt(ratio_of('external', 'gateway', 'minimal-proxy'), 3)} |")
    out.append(f"| external, nginx vs direct, c16 (reference) | - | "
               f"{_fmt(get('external', 'nginx', 16, 'calls_per_s_vs_direct'), 3)} |")
    out.append(f"| local, added p50 at c1 | <= 0.35 ms | "
               f"{_fmt(get('local', 'gateway', 1, 'p50_added_ms'), 3)} ms |")
    out.append(f"| local, records 100% to JSONL, c16, vs direct | >= 0.45 | "
               f"{_fmt(get('local', 'gateway+records', 16, 'calls_per_s_vs_direct'), 3)} |")
    for kind in KINDS:
        out.append(f"| {kind}, telemetry on vs off, c16 | >= 0.90 | "
                   f"{_fmt(ratio_of(kind, 'gateway', 'gateway-telemetry-off'), 3)} |")
    from bench.unknown_cell import summary_line

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
                    f"{_fmt(c.get('calls_per_s_vs_direct'))} | {c['p50_ms']:.3f} | "
                    f"{_fmt(c.get('p50_added_ms'), 3)} | {c['p99_ms']:.3f} | "
                    f"{_fmt(c.get('p99_vs_direct'))} | {_fmt(c['proxy_cpu_us_per_call'], 0)} | "
                    f"{_fmt(c.get('proxy_cpu_vs_direct_replica_cpu'))} | "
                    f"{_fmt(c['replica_cpu_us_per_call'], 0)} | "
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
                f"{_fmt(c.get('calls_per_s_vs_local_gateway'))} | {c['p50_ms']:.3f} | "
                f"{c['p99_ms']:.3f} | {_fmt(c['proxy_cpu_us_per_call'], 0)} | "
                f"{_fmt(c.get('proxy_cpu_us_vs_local_gateway'))} | "
                f"{'yes' if c['grpc_ok'] else 'NO: ' + '; '.join(c['problems'])} |")
    from bench.unknown_cell import render_unknown

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
        from bench.http_cell import render_http

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
    }
    if gw.records_path is not None:
        n = records_written(gw.records_path)
        f["prediction_records"] = (f"{n} records for {sent} calls" if n
                                   else "configured but none written (feature not active)")
    return f


def _scrape_ok(port: int) -> bool:
    try:
        scrape_statuses(port, "local")
        return True
    except OSError:
        return False


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


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "absent"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "?"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True,
                               check=False).stdout.strip()
    except OSError:
        return "?"
    return rev + (" (with uncommitted changes)" if dirty else "")


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[None]:
    try:
        yield
    finally:
        for c in reversed(children):
            with contextlib.suppress(Exception):
                c.stop()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Records go to JSONL, never to a real Arize account.
    for k in list(env):
        if k.startswith("ARIZE_"):
            del env[k]
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
        children.extend([*(g.child for g in gws.values()), mem_gw.child])
        for g in [*gws.values(), mem_gw]:
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
        minimal_addr = {k: "127.0.0.1:" + c.wait_for(r"listening (\d+)").group(1)
                        for k, c in minimal.items()}
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
        from bench.unknown_cell import add_unknown_ratios, with_unknown_twins

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
        features = {v: gateway_features(g) for v, g in gws.items()}
        paired = run_paired(*paired_pairs(targets), h2load, cpu_seconds, frame, work,
                            smoke=s.smoke)
        memory = measure_memory(mem_gw, s, frame, message, work)
        from bench.http_cell import run_http_cells  # imports this module: not at the top

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
