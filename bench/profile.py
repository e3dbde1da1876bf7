"""Where the gateway's per-call CPU goes: py-spy on the gateway under h2load load.

`python -m bench.profile [--seconds 10] [--concurrency 16] [--kind local|external] [--unknown]`
starts the default-observability gateway (as `make bench` does), drives Echo calls at it with
h2load (`--unknown`: `/bench.Unlisted/Echo`, a name the gateway cannot know, at the external
replica), samples the gateway process with `py-spy record --format raw`, and prints the
functions with the most self time (and an SVG flame graph with `--svg`). Needs py-spy
(`pip install py-spy`) and ptrace.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.echo_replica import ECHO_METHOD, UNLISTED_ECHO_METHOD
from bench.frames import write_echo_frame
from bench.procs import Child, child_env, start_gateway, stopping, wait_gateway

_LINE = re.compile(r"\s*\(([^()]*?)(?::\d+)?\)$")


def py_spy() -> str:
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("bench.profile: py-spy not found (pip install py-spy)")
    return found


def self_time(raw: str) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    """Samples per `function (file)` (self, inclusive) and per thread, from py-spy's raw
    `--threads` output; returns (self, inclusive, per thread, total)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            threads[frames[0].split(": ", 1)[-1]] += n
            frames = frames[1:] or ["<no Python frame>"]
        frames = [_LINE.sub(lambda m: f" ({m.group(1)})", f) for f in frames]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return own, incl, threads, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kind", choices=("local", "external"), default="local")
    p.add_argument("--variant", default="gateway",
                   choices=("gateway", "gateway+records", "gateway-telemetry-off"))
    p.add_argument("--unknown", action="store_true",
                   help="call /bench.Unlisted/Echo, unknown to the gateway (external replica)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--native", action="store_true",
                   help="include C frames (grpc's Cython core, the interpreter)")
    p.add_argument("--svg", type=Path, default=None, help="also write a flame graph here")
    a = p.parse_args(argv)
    if a.unknown and a.kind != "external":
        p.error("--unknown: only the external replica serves /bench.Unlisted/Echo")
    method = UNLISTED_ECHO_METHOD if a.unknown else ECHO_METHOD
    spy = py_spy()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    frame, _ = write_echo_frame(tmp / "echo.frame")
    env = child_env()
    children: list[Child] = []
    with stopping(children):
        ext = Child("external replica", [sys.executable, "-m", "bench.echo_replica"],
                    tmp / "external-replica.log", env=env)
        children.append(ext)
        ext_addr = "127.0.0.1:" + ext.wait_for(r"listening (\d+)").group(1)
        gw = start_gateway(a.variant, tmp, ext_addr, env)
        children.append(gw.child)
        wait_gateway(gw)
        load = ["h2load", "-c", "1", "-t", "1", "-m", str(a.concurrency), "-d", str(frame),
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                "-H", f"application: {a.kind}", "-D", f"{round((a.seconds + 2) * 1000)}ms",
                f"http://{gw.address}{method}"]
        h2 = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)  # warm
        raw = tmp / "profile.txt"
        # --native needs the process paused while a sample is taken (no --nonblocking).
        how = ["--native"] if a.native else ["--nonblocking"]
        how.append("--threads")
        rec = subprocess.run([spy, "record", "--pid", str(gw.child.pid), "--duration",
                              str(int(a.seconds)), "--rate", "250", *how, "--format", "raw",
                              "-o", str(raw)], capture_output=True, text=True,
                             timeout=a.seconds + 60)
        if rec.returncode != 0:
            h2.kill()
            raise SystemExit(f"py-spy failed:\n{rec.stdout}{rec.stderr}")
        if a.svg is not None:
            h2.wait(a.seconds + 30)
            h2 = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            time.sleep(1.0)
            subprocess.run([spy, "record", "--pid", str(gw.child.pid), "--duration",
                            str(int(a.seconds)), "--rate", "250", "--nonblocking", "-o",
                            str(a.svg)], check=True, capture_output=True,
                           timeout=a.seconds + 60)
        out, _ = h2.communicate(timeout=a.seconds + 30)
    rate = re.search(r"finished in .*?, ([\d.]+) req/s", out)
    if rate is None:
        print(f"h2load:\n{out}", file=sys.stderr)
    own, incl, threads, total = self_time(raw.read_text())
    print(f"gateway ({a.variant}) under h2load c={a.concurrency} to the {a.kind} replica: "
          f"({method}): {rate.group(1) if rate else '?'} calls/s; {total} samples over "
          f"{a.seconds:g}s "
          "(py-spy, Python frames only, idle threads excluded)")
    print("\n| thread | % of samples |\n|---|---:|")
    for name, n in threads.most_common():
        print(f"| {name} | {100 * n / total:.1f} |")
    print("\n| self % | incl % | function (file) |\n|---:|---:|---|")
    for fn, n in own.most_common(a.top):
        print(f"| {100 * n / total:.1f} | {100 * incl[fn] / total:.1f} | `{fn}` |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
