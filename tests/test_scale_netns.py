"""Past one machine, on one machine: hosts as network namespaces on a bridge.

Two gateway hosts discover three replica hosts through DNS (`dnsmasq` answering one name with
their addresses; the gateways use `dns:///models.test18.internal:50051`); a client host calls
through both gateways under bounded load. Mid-load one replica host's link goes down, a
fourth replica host is added to DNS, and one is removed from it. A real Prometheus on the
client host scrapes both gateways; `sum by (application)` of the request counter must equal
the calls the client sent. The test makes every namespace, link and process itself and
removes them (by pid, by name) even when it fails. Root and `ip netns` are required.

The figures (calls sent / failed, time until the new host takes calls) are printed; run
with `-s` to see them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
NAME = "models.test18.internal"
PORT = 50051
NET = "10.218.7"
TAG = f"g18{os.getpid() % 10000}"  # namespace / link names of this run (<= 15 chars each)


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"{TAG}p"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


_why = _netns_unavailable()
pytestmark = [pytest.mark.skipif(bool(_why), reason=_why), pytest.mark.timeout(300)]


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when pytest dies (even by SIGKILL), so a killed
    run leaves no gateway, replica, dnsmasq or Prometheus behind. `ip netns exec` execs the
    command in place, and the setting survives exec."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


class Lab:
    """The namespaces, the bridge, the processes; `close()` removes all of it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hosts: dict[str, str] = {}  # host name -> address
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sw = f"{TAG}sw"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{TAG}{host}"

    def setup_switch(self) -> None:
        sh("ip", "netns", "add", self.sw)
        self.made.append(self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")

    def add_host(self, host: str, last_octet: int, resolver: bool = False) -> str:
        ns = self.ns(host)
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        addr = f"{NET}.{last_octet}"
        # One cable: eth0 in the host, its peer a port of the bridge in the switch.
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
           "peer", "name", f"p{host}", "netns", self.sw)
        sh("ip", "-n", self.sw, "link", "set", f"p{host}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        if resolver:
            # `ip netns exec` mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {NET}.2\noptions timeout:1\n")
        self.hosts[host] = addr
        return addr

    def link(self, host: str, up: bool) -> None:
        """Pull (or plug back) the host's cable at the switch: its packets vanish."""
        sh("ip", "-n", self.sw, "link", "set", f"p{host}", "up" if up else "down")

    def start(self, host: str, name: str, args: list[str],
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *args], cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        log.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_output(self, name: str, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output(name):
                return
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.output(name)}")
            time.sleep(0.1)
        raise RuntimeError(f"{name}: no {text!r} within {timeout}s:\n{self.output(name)}")

    def stop(self, name: str, grace: float = 10.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> list[str]:
        """Removes everything; returns the processes that outlived their stop (killed now)."""
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name, grace=5)
        left: list[str] = []
        for ns in reversed(self.made):
            # Anything still running in one of our namespaces is ours (a replica a gateway
            # left, a child of a killed process): say so, and kill it by pid.
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    left.append(f"{ns}: {pid} {cmd.decode(errors='replace')[:120]}")
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(Path("/etc/netns") / ns)
        left += [f"{name}: {p.pid}" for name, p in self.procs.items() if p.poll() is None]
        return left


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        procs = lab.close()
        left = sh("ip", "netns", "list").stdout
        assert TAG not in left, f"namespaces left behind: {left}"
        assert not procs, f"processes left behind: {procs}"


def test_lab_reports_and_kills_what_is_left_in_its_namespaces(tmp_path: Path) -> None:
    """The leftover check sees processes too: one left running in a namespace (here started
    behind the lab's back) is reported and killed when the lab closes."""
    lab = Lab(tmp_path)
    try:
        lab.setup_switch()
        stray = subprocess.Popen(["ip", "netns", "exec", lab.sw, "sleep", "60"],
                                 preexec_fn=_die_with_parent)
        end = time.monotonic() + 10
        while time.monotonic() < end and not sh("ip", "netns", "pids", lab.sw).stdout.strip():
            time.sleep(0.05)
    finally:
        left = lab.close()
    assert len(left) == 1 and "sleep 60" in left[0], left
    assert stray.wait(5) == -signal.SIGKILL
    assert TAG not in sh("ip", "netns", "list").stdout


def write_dns(lab: Lab, path: Path, hosts: list[str], dnsmasq: str) -> None:
    path.write_text("".join(f"{lab.hosts[h]} {NAME}\n" for h in hosts))
    if dnsmasq in lab.procs:
        lab.procs[dnsmasq].send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files


def gateway_config(path: Path, logs: Path) -> None:
    path.write_text(f"""
proxy: {{host: 0.0.0.0, port: 9000, graceful_shutdown_timeout_s: 2}}
admin: {{host: 127.0.0.1, port: 9001}}
metrics: {{prometheus: {{host: 0.0.0.0, port: 8080}}}}
logging_config: {{logs_dir: {logs}, disable_access_log: true}}
applications:
  - name: text
    deployments:
      - name: Remote
        targets: ["dns:///{NAME}:{PORT}"]
        dns_refresh_s: 1
        health_check_period_s: 0.5
        health_check_timeout_s: 1
        max_ongoing_requests: 8
""")


def prom_query(lab: Lab, query: str) -> list[dict[str, Any]]:
    url = (f"http://{lab.hosts['client']}:9090/api/v1/query?"
           + urllib.parse.urlencode({"query": query}))
    r = sh("ip", "netns", "exec", lab.ns("client"), "curl", "-s", "--max-time", "5", url,
           check=False)
    if r.returncode != 0 or not r.stdout:
        return []
    data = json.loads(r.stdout)
    return list(data.get("data", {}).get("result", []))


def test_two_gateways_dns_replicas_link_down_add_and_remove(lab: Lab, tmp_path: Path) -> None:
    for tool in ("dnsmasq", "prometheus", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
    py = sys.executable
    lab.setup_switch()
    lab.add_host("dns", 2)
    for i, h in enumerate(("gw1", "gw2")):
        lab.add_host(h, 11 + i, resolver=True)
    for i, h in enumerate(("r1", "r2", "r3", "r4")):
        lab.add_host(h, 21 + i)
    lab.add_host("client", 30)

    hosts_file = tmp_path / "dns_hosts"
    write_dns(lab, hosts_file, ["r1", "r2", "r3"], "dnsmasq")
    lab.start("dns", "dnsmasq", [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", f"--addn-hosts={hosts_file}", f"--listen-address={NET}.2",
        "--bind-interfaces", "--local-ttl=0", "--user=root", "--pid-file=",
        "--log-facility=-"])
    for h in ("r1", "r2", "r3", "r4"):
        lab.start(h, h, [py, "-m", "gateway.runtime.replica", "--import-path",
                         "examples.models:TextModel", "--host", "0.0.0.0",
                         "--port", str(PORT), "--grace", "2"],
                  env={"GATEWAY_REPLICA_ID": h})
    for h in ("r1", "r2", "r3", "r4"):
        lab.wait_output(h, '"port"', 30)
    for h in ("gw1", "gw2"):
        cfg = tmp_path / f"{h}.yaml"
        gateway_config(cfg, tmp_path / f"{h}-logs")
        lab.start(h, h, [py, "-m", "gateway.cli", "run", str(cfg)])
    for h in ("gw1", "gw2"):
        lab.wait_output(h, "application 'text': RUNNING", 60)
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: gateway
    static_configs:
      - targets: ["{lab.hosts['gw1']}:8080", "{lab.hosts['gw2']}:8080"]
""")
    lab.start("client", "prometheus", [
        "prometheus", f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={lab.hosts['client']}:9090"])
    lab.wait_output("prometheus", "Server is ready to receive web requests", 60)

    # Load: 30 s, <= 150 calls/s, <= 12 in flight, through both gateways.
    gws = ",".join(f"{lab.hosts[h]}:9000" for h in ("gw1", "gw2"))
    load = lab.start("client", "load", [py, "-m", "tests.netns_load", gws, "30", "150", "12"])
    t0 = time.time()
    events: dict[str, float] = {}
    time.sleep(6)
    lab.link("r2", up=False)
    events["r2 link down"] = time.time()
    time.sleep(6)
    write_dns(lab, hosts_file, ["r1", "r2", "r3", "r4"], "dnsmasq")
    events["r4 added to DNS"] = time.time()
    time.sleep(6)
    write_dns(lab, hosts_file, ["r2", "r3", "r4"], "dnsmasq")
    events["r1 removed from DNS"] = time.time()
    load.wait(60)
    lines = [ln for ln in lab.output("load").splitlines() if ln.startswith("{")]
    assert load.returncode == 0 and lines, lab.output("load")
    res = json.loads(lines[-1])

    new_host_after = res["first"].get("r4", float("inf")) - events["r4 added to DNS"]
    figures = {
        "calls_sent": res["sent"], "calls_ok": res["ok"], "calls_failed": res["failed"],
        "failed_by_code": res["codes"], "per_gateway": res["per_gateway"],
        "per_replica": res["per_replica"],
        "r4_takes_calls_after_s": round(new_host_after, 2),
        "r1_last_call_after_removal_s": round(
            res["last"].get("r1", 0) - events["r1 removed from DNS"], 2),
        "r2_last_call_after_link_down_s": round(
            res["last"].get("r2", 0) - events["r2 link down"], 2),
        "events_s": {k: round(v - t0, 1) for k, v in events.items()},
    }
    print("\nnetns scale test figures:", json.dumps(figures, indent=1))
    (tmp_path / "figures.json").write_text(json.dumps(figures))

    assert res["sent"] == res["ok"] + res["failed"] and res["sent"] > 0
    assert set(res["per_gateway"]) == set(gws.split(","))
    assert {"r1", "r2", "r3", "r4"} <= set(res["per_replica"]), res["per_replica"]
    # The new host takes calls (soon after DNS says so: the figure above says how soon).
    assert new_host_after < 20
    # r2's cable is out: nothing answers from it afterwards; r1 left DNS: it drains.
    assert res["last"]["r2"] < events["r2 link down"] + 1
    assert res["last"]["r1"] < events["r1 removed from DNS"] + 5
    # Failures only where a host vanished mid-call (calls in flight on r2), none from the
    # DNS changes (an added host joins once healthy, a removed one drains).
    for at, code, details in res["failures"]:
        assert events["r2 link down"] <= at <= events["r2 link down"] + 8, (at, code, details)
        assert code in ("DEADLINE_EXCEEDED", "UNAVAILABLE"), (code, details)
    assert res["failed"] <= 12 * 2

    # Prometheus: both gateways, summed per application, equal the client's count. Calls
    # cut by the deadline are counted once their gateway ends them: poll (bounded).
    query = "sum by (application) (ray_serve_num_grpc_requests_total)"
    end = time.monotonic() + 30
    got: list[dict[str, Any]] = []
    while time.monotonic() < end:
        got = prom_query(lab, query)
        if got and float(got[0]["value"][1]) == res["sent"]:
            break
        time.sleep(1)
    assert [(g["metric"].get("application"), float(g["value"][1])) for g in got] == [
        ("text", float(res["sent"]))], got
    per_instance = prom_query(lab, "sum by (instance) (ray_serve_num_grpc_requests_total)")
    assert {g["metric"]["instance"] for g in per_instance} == {
        f"{lab.hosts['gw1']}:8080", f"{lab.hosts['gw2']}:8080"}
