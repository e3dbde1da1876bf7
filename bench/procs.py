"""The processes a benchmark run starts and stops: replicas, gateway variants, nginx.

Each is a `Child` stopped by its own pid (never by name); `stopping` stops them all on the way
out. The gateway variants' goal states are built and validated here (`gateway_config_data`).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from gateway.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"
KINDS = ("local", "external")
GATEWAY_VARIANTS = ("gateway", "gateway+records", "gateway-telemetry-off")
LOOP_VARIANT = "gateway-uvloop"
"""The default gateway on uvloop (`proxy.event_loop`): paired only."""
MUX_KIND = "multiplexed"
"""Application (and cell kind) with model multiplexing on, in the default gateway only."""
MUX_MODEL = "bench-model"
START_TIMEOUT_S = 60.0


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
    elif variant == LOOP_VARIANT:
        data["proxy"]["event_loop"] = "uvloop"
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
