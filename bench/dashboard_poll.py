"""Does watching the dashboard slow calls? `python -m bench.dashboard_poll`.

One `gateway run` with the dashboard on and the benchmark's local Echo replica. Rounds
alternate: h2load alone for `--seconds`, then h2load while a client fetches, every second,
what the overview and processes pages fetch (overview, Ray's applications API, the
application's chart series, processes) plus a follow of the gateway log. Alternating rounds
spread the machine's noise over both sides; the summary is the median of each side.
Bounded: `--rounds` x 2 x `--seconds`, plus start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from bench.frames import write_echo_frame
from bench.load import h2load
from bench.procs import Child, child_env, free_port

POLLED = ("/api/gateway/overview", "/api/serve/applications/",
          "/api/gateway/timeseries?application=local", "/api/gateway/processes")
LOG = "/api/gateway/logs?component=gateway&limit=5000"
"""Followed as the log page does: the tail once, then what came after the last offset."""


class Poller(threading.Thread):
    """Fetches every polled path once a second until stopped; counts fetches and errors."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.stop_event = threading.Event()
        self.fetches = 0
        self.errors = 0

    def run(self) -> None:
        offset: int | None = None
        while not self.stop_event.is_set():
            log = LOG if offset is None else f"{LOG}&after={offset}"
            for path in (*POLLED, log):
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as r:
                        body = r.read()
                    if path == log:
                        offset = json.loads(body)["offset"]
                    self.fetches += 1
                except (OSError, ValueError, KeyError):
                    self.errors += 1
            self.stop_event.wait(1.0)


def _cpu_during(proc: psutil.Process, seconds: float, base: str | None) -> float:
    """CPU seconds per second `proc` used over `seconds` (polling its dashboard if `base`)."""
    poller = Poller(base) if base else None
    if poller is not None:
        poller.start()
    t = proc.cpu_times()
    before = t.user + t.system
    time.sleep(seconds)
    t = proc.cpu_times()
    if poller is not None:
        poller.stop_event.set()
        poller.join(10)
    return float(t.user + t.system - before) / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dash-bench-") as tmp_s:
        tmp = Path(tmp_s)
        data = {
            "proxy": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "metrics": {"prometheus": {"host": "127.0.0.1", "port": free_port()}},
            "dashboard": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
            "logging_config": {"logs_dir": str(tmp / "logs")},
            "proto_modules": ["gateway.pb.bench_pb2"],
            "applications": [{"name": "local", "deployments": [{
                "name": "Echo", "import_path": "bench.echo_replica:Echo", "num_replicas": 1,
                "max_ongoing_requests": 256, "max_queued_requests": 1000}]}],
        }
        cfg = tmp / "config.yaml"
        cfg.write_text(yaml.safe_dump(data))
        frame, _ = write_echo_frame(tmp / "echo.bin")
        import sys

        gw = Child("gateway", [sys.executable, "-m", "gateway.cli", "run", str(cfg)],
                   tmp / "out.log", env=child_env())
        try:
            address = gw.wait_for(r"serving gRPC on (\S+)").group(1)
            base = gw.wait_for(r"dashboard on (\S+)").group(1)
            gw.wait_for(r"application 'local': RUNNING")
            h2load(address, args.concurrency, frame, "local", tmp, duration_s=2.0)  # warm-up
            # What polling costs the gateway process itself, in CPU, with no calls running:
            # a steadier figure than calls/s on a shared machine.
            proc = psutil.Process(gw.pid)
            cpu_idle = _cpu_during(proc, args.seconds, None)
            cpu_polled = _cpu_during(proc, args.seconds, base)
            print(f"gateway CPU, no calls: {cpu_idle * 1000:.1f} ms/s without polling, "
                  f"{cpu_polled * 1000:.1f} ms/s with polling", flush=True)
            plain: list[float] = []
            polled: list[float] = []
            fetches = errors = 0
            for i in range(args.rounds):
                a = h2load(address, args.concurrency, frame, "local", tmp,
                           duration_s=args.seconds)
                poller = Poller(base)
                poller.start()
                time.sleep(0.2)
                b = h2load(address, args.concurrency, frame, "local", tmp,
                           duration_s=args.seconds)
                poller.stop_event.set()
                poller.join(10)
                fetches += poller.fetches
                errors += poller.errors
                plain.append(a.calls_per_s)
                polled.append(b.calls_per_s)
                print(f"round {i + 1}: without polling {a.calls_per_s:8.0f} calls/s, "
                      f"with polling {b.calls_per_s:8.0f} calls/s", flush=True)
        finally:
            gw.stop()
    m_plain, m_polled = statistics.median(plain), statistics.median(polled)
    print(f"median: without {m_plain:.0f} calls/s, with {m_polled:.0f} calls/s "
          f"({(m_polled / m_plain - 1) * 100:+.1f}%); {fetches} API fetches, {errors} errors; "
          f"h2load 1 connection, {args.concurrency} streams, unary /bench.Echo/Echo")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
