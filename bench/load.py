"""Load and verification clients: h2load runs (the measured load) and Python gRPC calls that
read each status from the trailers (what h2load cannot see)."""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.echo_replica import ECHO_METHOD, STATS_METHOD
from gateway.pb import bench_pb2


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
