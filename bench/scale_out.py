"""What N gateways on one machine give: `python -m bench.scale_out [--calls C] [--max N]`.

N `gateway run` processes share one port (`proxy.reuse_port: true`, SO_REUSEPORT: the kernel
spreads new connections over them), each with its own admin and metrics ports, all in front
of the same two external echo replicas (`python -m bench.echo_replica`). h2load drives unary
`/bench.Echo/Echo` calls over 8 connections x 8 streams (a fixed count per N); every call must
be a gRPC OK, which each gateway's own /metrics says (h2load sees HTTP statuses only), and
that also shows how the kernel spread the calls. Prints a markdown table.

The figures depend on the machine: on a box whose cores other work shares, a second
gateway gains only what CPU is free.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.frames import write_echo_frame

ECHO = "/bench.Echo/Echo"
CONNECTIONS, STREAMS = 8, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m.group(1) if m.groups() else m.group(0)
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n{text}")
        time.sleep(0.1)
    raise RuntimeError(f"no {pattern!r} in {log} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _counted(metrics_url: str) -> tuple[int, int]:
    """(calls, non-OK calls) this gateway counted, from its Prometheus endpoint."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = errors = 0.0
    for line in text.splitlines():
        if line.startswith("ray_serve_num_grpc_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_serve_num_grpc_error_requests_total{"):
            errors += float(line.rsplit(" ", 1)[1])
    return int(total), int(errors)


def h2load(address: str, frame: Path, calls: int) -> tuple[float, int, int]:
    """(calls/s, calls OK, calls failed); OK means HTTP 200 and grpc-status 0 for all."""
    cmd = ["h2load", "-c", str(CONNECTIONS), "-t", "1", "-m", str(STREAMS), "-d", str(frame),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           "-H", "application: echo", "-n", str(calls),
           f"http://{address}{ECHO}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + calls / 50,
                         check=False).stdout
    fin = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    req = re.search(r"(\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not fin or not req:
        raise RuntimeError(f"h2load: {out}")
    return float(fin.group(1)), int(req.group(2)), int(req.group(3)) + int(req.group(4))


Row = tuple[int, float, int, int, list[int]]


def run(calls: int, most: int) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="scale_out_"))
    frame, _ = write_echo_frame(work / "echo.bin")
    procs: list[subprocess.Popen[bytes]] = []
    rows = []
    try:
        replicas = []
        for i in range(2):
            log = work / f"echo{i}.log"
            p = _start([sys.executable, "-m", "bench.echo_replica"], log)
            procs.append(p)
            rport = _wait_for(log, r"listening (\d+)", p, 30)
            replicas.append(f"127.0.0.1:{rport}")
        port = _free_port()
        for n in range(1, most + 1):
            gws, urls = [], []
            for i in range(n):
                cfg = work / f"gw{n}-{i}.yaml"
                cfg.write_text(
                    f"proxy: {{port: {port}, reuse_port: true}}\n"
                    f"admin: {{port: 0}}\nmetrics: {{prometheus: {{port: 0}}}}\n"
                    f"logging_config: {{logs_dir: {work / f'logs{n}-{i}'}}}\n"
                    "applications:\n  - name: echo\n    deployments:\n"
                    f"      - {{name: Echo, targets: {replicas}, max_ongoing_requests: 64}}\n")
                log = work / f"gw{n}-{i}.log"
                g = _start([sys.executable, "-m", "gateway.cli", "run", str(cfg)], log)
                gws.append(g)
                procs.append(g)
                _wait_for(log, r"serving gRPC on", g, 60)
                urls.append(_wait_for(log, r"metrics on (http://\S+)", g, 10))
            h2load(f"127.0.0.1:{port}", frame, 500)  # warm-up
            before = [_counted(u) for u in urls]
            rate, ok, failed = h2load(f"127.0.0.1:{port}", frame, calls)
            after = [_counted(u) for u in urls]
            per_gw = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
            grpc_errors = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
            rows.append((n, rate, ok, failed + grpc_errors, per_gw))
            for g in gws:
                _stop(g)
    finally:
        for p in procs:
            _stop(p)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000, help="calls per measurement")
    ap.add_argument("--max", type=int, default=2, help="largest number of gateways")
    a = ap.parse_args()
    rows = run(a.calls, a.max)
    print(f"cores: {os.cpu_count()}, load: {os.getloadavg()[0]:.1f} (1 min)")
    print("| gateways | calls/s | vs 1 | calls | failed | calls per gateway |")
    print("|---|---|---|---|---|---|")
    for n, rate, ok, failed, per_gw in rows:
        split = " / ".join(str(c) for c in per_gw)
        print(f"| {n} | {rate:,.0f} | {rate / rows[0][1]:.2f}x | {ok} | {failed} | {split} |")


if __name__ == "__main__":
    main()
