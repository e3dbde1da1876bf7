"""The unknown-method cell's pieces (bench/unknown_cell.py, issue 17), with the real processes
`make bench` starts: the echo replica serves the unlisted name with its own counter and keeps it
out of reflection, nothing the gateway is given describes it, and the bench's default gateway
forwards it as a method it does not know. No timing asserts.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import gateway.pb
from bench import cells as bench_cells
from bench import load, procs, unknown_cell
from bench.echo_replica import (
    ECHO_METHOD,
    STATS_METHOD,
    UNLISTED_ECHO_METHOD,
    UNLISTED_SERVICE,
    UNLISTED_STATS_METHOD,
)
from bench.frames import echo_request, write_echo_frame
from gateway.dataplane.methods import MethodTable, fetch_reflection


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[tuple[str, procs.Child]]:
    """`python -m bench.echo_replica`, the external replica of `make bench`."""
    children: list[procs.Child] = []
    with procs.stopping(children):
        rep = procs.Child("external replica", [sys.executable, "-m", "bench.echo_replica"],
                              tmp_path / "replica.log", env=procs.child_env())
        children.append(rep)
        yield "127.0.0.1:" + rep.wait_for(r"listening (\d+)").group(1), rep


def test_replica_serves_the_unlisted_name_with_its_own_count(
        replica: tuple[str, procs.Child]) -> None:
    address, _ = replica
    msg = echo_request()
    clients = load.Clients()
    try:
        assert clients.verify(address, "external", msg, 3, method=UNLISTED_ECHO_METHOD) is None
        assert clients.verify(address, "external", msg, 2) is None  # the listed name
        # Each name's Stats counts its own calls only: the cell's "served exactly n" is exact.
        assert clients.replica_calls(address, UNLISTED_STATS_METHOD) == 3
        assert clients.replica_calls(address, STATS_METHOD) == 2
    finally:
        clients.close()


async def test_reflection_and_gateway_protos_do_not_describe_it(
        replica: tuple[str, procs.Child]) -> None:
    address, _ = replica
    async with grpc.aio.insecure_channel(address) as ch:
        files = await fetch_reflection(ch)
    listed = {f"/{s.full_name}/{m.name}" for fd in files for s in fd.services_by_name.values()
              for m in s.methods}
    assert ECHO_METHOD in listed  # reflection works, and lists the known name
    assert not any(p.startswith(f"/{UNLISTED_SERVICE}/") for p in listed), listed
    # Nothing in gateway/pb (the bench config's proto_modules among them) defines it.
    table = MethodTable(["gateway.pb.bench_pb2"])
    for mod in pkgutil.iter_modules(gateway.pb.__path__):
        if mod.name.endswith("_pb2"):
            table.add_module(importlib.import_module(f"gateway.pb.{mod.name}"))
    assert table.get(ECHO_METHOD) is not None
    assert table.get(UNLISTED_ECHO_METHOD) is None
    assert UNLISTED_SERVICE not in table.services()


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed")
@pytest.mark.timeout(180)
def test_bench_gateway_forwards_it_as_unknown(replica: tuple[str, procs.Child],
                                              tmp_path: Path) -> None:
    """The bench's default gateway, its external application, one smoke cell of each twin."""
    address, rep = replica
    children: list[procs.Child] = []
    clients = load.Clients()
    with procs.stopping(children):
        gw = procs.start_gateway("gateway", tmp_path, address, procs.child_env())
        children.append(gw.child)
        procs.wait_gateway(gw)
        check = unknown_cell.treated_as_unknown(gw)
        passed, found = check()
        assert not passed and "does not name" in found  # the check bites before any call
        known = [bench_cells.Target("external", "gateway", gw.address, address, rep.pid,
                                  lambda: [gw.child.pid], gateway=gw),
                 bench_cells.Target("external", "direct", address, address, rep.pid, lambda: [])]
        targets = unknown_cell.with_unknown_twins(known)
        assert [t.name for t in targets] == ["gateway", "gateway (unknown method)", "direct",
                                             "direct (unknown method)"]
        frame, msg = write_echo_frame(tmp_path / "echo.frame")
        work = tmp_path / "work"
        work.mkdir()
        try:
            cells = [bench_cells.run_cell(t, 16, bench_cells.SMOKE, frame, msg, clients, work)
                     for t in targets]
        finally:
            clients.close()
        for c in cells:
            assert c["grpc_ok"], (c["target"], c["problems"])
        twin = cells[1]
        n = twin["calls"]
        assert f"the replica served exactly {n} calls of {UNLISTED_ECHO_METHOD}" in twin["checks"]
        # Counted under the method's own name (an answered unknown name keeps its label).
        assert any(f'method="{UNLISTED_ECHO_METHOD}"' in x for x in twin["checks"]), twin
        assert any("is a method it does not know" in x for x in twin["checks"]), twin
        assert bench_cells.scrape_statuses(gw.metrics_port or 0, "external",
                                         UNLISTED_ECHO_METHOD)["OK"] >= n
        # Ratios against the known-method counterparts, and the targets row.
        unknown_cell.add_unknown_ratios(cells)
        assert twin["calls_per_s_vs_known"] > 0 and cells[3]["calls_per_s_vs_known"] > 0
        assert unknown_cell.summary_line(cells).startswith(f"| {unknown_cell.SUMMARY_LABEL} |")
        assert " | - |" not in unknown_cell.summary_line(cells)
        rows = unknown_cell.render_unknown(cells, [16])
        assert any(r.startswith("| gateway (unknown method) | 16 |") for r in rows)
