"""DNS-discovered replicas (`targets: ["dns:///name:port"]`): real external replicas on
loopback, a real gateway, and a resolver the test controls (the answer it gives changes
during the test); plus the system resolver off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from examples.models import TextModel
from gateway.admin.service import AdminClient
from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.control import discovery as discovery_mod
from gateway.dataplane.replicas import ReplicaState
from gateway.pb.text_model_pb2 import PredictRequest
from tests.conftest import external_replica, gateway_config, md, text_stub
from tests.metrics_util import scrape

NAME = "dns:///models.test.internal:50051"


class Named(TextModel):
    """TextModel that says which server answered (in `label`) and counts its calls."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.calls = 0

    async def Predict(self, request: Any, context: Any) -> Any:
        self.calls += 1
        resp = await super().Predict(request, context)
        resp.label = self.name
        return resp


class FakeDNS:
    """The resolver the gateway uses in these tests: answers what the test says."""

    def __init__(self) -> None:
        self.answer: list[str] = []
        self.error: Exception | None = None
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        assert (host, port) == ("models.test.internal", 50051)
        self.lookups += 1
        if self.error is not None:
            raise self.error
        return list(self.answer)


@contextlib.asynccontextmanager
async def gateway(tmp: Path, dns: FakeDNS, **dep: Any) -> AsyncIterator[Gateway]:
    apps = [{"name": "text", "deployments": [{
        "name": "Remote", "targets": [NAME], "health_check_period_s": 0.2,
        "dns_refresh_s": 0.3, **dep}]}]
    gw = Gateway(gateway_config(apps, tmp), logs_dir=tmp / "logs")
    gw.controller.discovery.resolve = dns.resolve
    await gw.start(ready_timeout=15)
    try:
        yield gw
    finally:
        await gw.stop(grace=2)


def slots(gw: Gateway) -> dict[str, ReplicaState]:
    return {s.replica_id: s.state for _, s in gw.controller.slots()}


async def until(pred: Any, timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or pred}")


@contextlib.asynccontextmanager
async def servers(*names: str) -> AsyncIterator[list[tuple[Named, grpc.aio.Server, str]]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for n in names:
            model = Named(n)
            server, port = await stack.enter_async_context(external_replica(model))
            out.append((model, server, f"127.0.0.1:{port}"))
        yield out


# -- config -----------------------------------------------------------------------------------


def test_config_accepts_dns_targets_and_says_what_is_wrong() -> None:
    def dep(**kw: Any) -> dict[str, Any]:
        return {"applications": [{"name": "a", "deployments": [{"name": "D", **kw}]}]}

    cfg = parse_config(dep(targets=[NAME, "10.0.0.9:7000"]))
    d = cfg.applications[0].deployments[0]
    assert d.targets == [NAME, "10.0.0.9:7000"] and d.dns_refresh_s == 10.0
    for bad, words in [
        (["dns://8.8.8.8/models:50051"], "three slashes"),
        (["dns:///models"], "dns:///name:port"),
        (["dns:///:50051"], "dns:///name:port"),
        (["dns:///models:0"], "port 1-65535"),
        (["dns:///a/b:50051"], "dns:///name:port"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config(dep(targets=bad))
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config(dep(targets=[NAME, NAME]))
    with pytest.raises(ConfigError, match="num_replicas would be ignored"):
        parse_config(dep(targets=[NAME], num_replicas=3))
    with pytest.raises(ConfigError, match="dns_refresh_s"):
        parse_config(dep(targets=[NAME], dns_refresh_s=0))


# -- the gateway --------------------------------------------------------------------------------


async def test_every_resolved_address_is_a_replica_with_its_own_row_and_label(
    tmp_path: Path,
) -> None:
    dns = FakeDNS()
    async with servers("A", "B") as srv:
        dns.answer = [a for _, _, a in srv]
        async with gateway(tmp_path, dns) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            await until(lambda: set(slots(gw)) == set(dns.answer)
                        and all(s is ReplicaState.RUNNING for s in slots(gw).values()))
            seen = set()
            for _ in range(40):
                r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(),
                                                timeout=5)
                seen.add(r.label)
            assert seen == {"A", "B"}
            # `gateway status --verbose`: one row per address.
            loop = asyncio.get_running_loop()
            with AdminClient(f"127.0.0.1:{gw.admin_port}", None, timeout=10) as admin:
                st = await loop.run_in_executor(None, admin.status)
            text = st.to_yaml(verbose=True)
            for addr in dns.answer:
                assert text.count(addr) >= 1, text
            reps = [r for a in st.applications.values() for d in a.deployments.values()
                    for r in d.replicas]
            assert sorted((r.replica_id, r.address) for r in reps) == \
                sorted((a, a) for a in dns.answer)
            rows = {s.replica_id: s for _, s in gw.controller.slots()}
            for addr in dns.answer:
                assert rows[addr].replica is not None and rows[addr].replica.address == addr
            got = await scrape(gw)
            replicas = {dict(k).get("replica")
                        for k in got.series("ray_serve_deployment_replica_healthy")}
            assert replicas == set(dns.answer)


async def test_added_address_joins_once_healthy_removed_one_drains(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A", "B", "C") as srv:
        (a, _, addr_a), (b, _, addr_b), (c, _, addr_c) = srv  # c: C joins later
        dns.answer = [addr_a, addr_b]
        async with gateway(tmp_path, dns, max_ongoing_requests=4) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            stub = text_stub(ch)
            await until(lambda: len(slots(gw)) == 2
                        and all(s is ReplicaState.RUNNING for s in slots(gw).values()))
            # A long call on each replica: the one on B must finish although B leaves.
            long_calls = [asyncio.ensure_future(stub.Predict(
                PredictRequest(text="x", sleep_s=1.5), metadata=md(), timeout=10))
                for _ in range(4)]
            await until(lambda: b.calls > 0 and a.calls > 0, what="calls on A and B")
            b_before = b.calls
            dns.answer = [addr_a, addr_c]
            await until(lambda: slots(gw).get(addr_c) is ReplicaState.RUNNING,
                        what="C running")
            await until(lambda: addr_b not in slots(gw), timeout=15, what="B gone")
            results = await asyncio.gather(*long_calls, return_exceptions=True)
            assert all(not isinstance(r, BaseException) for r in results), results
            assert {r.label for r in results} == {"A", "B"}  # type: ignore[union-attr]
            labels = set()
            for _ in range(40):
                r = await stub.Predict(PredictRequest(text="good"), metadata=md(), timeout=5)
                labels.add(r.label)
            assert labels == {"A", "C"} and c.calls > 0
            assert b.calls == b_before, "a call went to the drained replica"
            app = gw.controller.apps["text"]
            assert app.status == "RUNNING"


async def test_failed_lookup_keeps_the_replicas_and_says_why(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A") as srv:
        dns.answer = [srv[0][2]]
        async with gateway(tmp_path, dns) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            await until(lambda: list(slots(gw).values()) == [ReplicaState.RUNNING])
            dns.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            dep = gw.controller.apps["text"].deployments["Remote"]
            await until(lambda: "lookup failed" in dep.message, what="lookup error shown")
            assert "Name or service not known" in dep.message
            r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(),
                                            timeout=5)
            assert r.label == "A"
            dns.error = None
            await until(lambda: dep.message == "", what="error cleared")
            # Any exception from a resolver is one failed lookup, not the end of discovery.
            dns.error = ValueError("label empty or too long")
            await until(lambda: "lookup failed: label empty" in dep.message)
            dns.error = None
            await until(lambda: dep.message == "", what="error cleared again")


async def test_name_that_resolves_to_nothing_is_unhealthy_with_a_message(
    tmp_path: Path,
) -> None:
    dns = FakeDNS()  # empty answer
    async with gateway(tmp_path, dns) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        dep = gw.controller.apps["text"].deployments["Remote"]
        await until(lambda: not dep.discovery_pending)
        assert dep.status == "UNHEALTHY" and "resolves to no address" in dep.message
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(), timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_unreachable_replica_triggers_a_lookup_before_the_refresh_period(
    tmp_path: Path,
) -> None:
    dns = FakeDNS()
    async with servers("A", "B") as srv:
        dns.answer = [srv[0][2], srv[1][2]]
        async with gateway(tmp_path, dns, dns_refresh_s=60) as gw:
            await until(lambda: len(slots(gw)) == 2
                        and all(s is ReplicaState.RUNNING for s in slots(gw).values()))
            before = dns.lookups
            dns.answer = [srv[0][2]]
            await srv[1][1].stop(0)  # B's host is gone
            await until(lambda: set(slots(gw)) == {srv[0][2]}, timeout=10,
                        what="B dropped after a kicked lookup")
            # Kicks are rate-limited: a failing replica does not hammer the resolver.
            assert dns.lookups - before <= 5


async def test_removing_the_deployment_stops_discovery(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A") as srv:
        dns.answer = [srv[0][2]]
        async with gateway(tmp_path, dns) as gw:
            await until(lambda: len(slots(gw)) == 1)
            await gw.apply(parse_config({"proxy": {"port": 0}, "admin": {"port": 0},
                                         "metrics": {"prometheus": {"port": 0}},
                                         "applications": []}))
            n = dns.lookups
            await asyncio.sleep(1.0)
            assert dns.lookups == n and slots(gw) == {}


# -- the system resolver --------------------------------------------------------------------------


async def test_system_resolver_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo
    release = threading.Event()

    def slow(*a: Any, **kw: Any) -> Any:
        release.wait(5)
        return real(*a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    lookup = asyncio.ensure_future(discovery_mod.system_resolve("127.0.0.1", 50051))
    ticks = 0
    for _ in range(10):  # the loop keeps running while the lookup is stuck
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 10 and not lookup.done()
    release.set()
    assert await asyncio.wait_for(lookup, 5) == ["127.0.0.1:50051"]


async def test_system_resolver_brackets_ipv6() -> None:
    assert await discovery_mod.system_resolve("::1", 7) == ["[::1]:7"]


async def test_a_runaway_answer_adds_at_most_max_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discovery_mod, "MAX_ADDRESSES", 2)
    dns = FakeDNS()
    async with servers("A", "B", "C") as srv:
        dns.answer = [a for _, _, a in srv]
        async with gateway(tmp_path, dns) as gw:
            await until(lambda: len(slots(gw)) == 2)
            await asyncio.sleep(1.0)  # several refreshes later: still 2
            assert set(slots(gw)) == set(dns.answer[:2])


async def test_deploy_moves_between_dns_and_static_targets(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A", "B", "S") as srv:
        dns.answer = [srv[0][2], srv[1][2]]
        static = srv[2][2]
        async with gateway(tmp_path, dns) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            await until(lambda: len(slots(gw)) == 2
                        and all(s is ReplicaState.RUNNING for s in slots(gw).values()))

            def config(targets: list[str]) -> Any:
                return gateway_config([{"name": "text", "deployments": [{
                    "name": "Remote", "targets": targets, "health_check_period_s": 0.2,
                    "dns_refresh_s": 0.3}]}], tmp_path)

            assert await gw.apply(config([static])) == []
            await until(lambda: [s.target for _, s in gw.controller.slots()] == [static])
            n = dns.lookups
            await asyncio.sleep(0.8)
            assert dns.lookups == n, "the old name is still looked up"
            r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(),
                                            timeout=5)
            assert r.label == "S"
            assert await gw.apply(config([NAME])) == []
            await until(lambda: set(slots(gw)) == set(dns.answer)
                        and all(s is ReplicaState.RUNNING for s in slots(gw).values()))
            await asyncio.sleep(0.8)  # the watcher adopted the roll's slots: no duplicates
            assert sorted(s.target or "" for _, s in gw.controller.slots()) == \
                sorted(dns.answer)
            dep = gw.controller.apps["text"].deployments["Remote"]
            # The same config again is no change (no roll).
            before = list(dep.slots)
            assert await gw.apply(config([NAME])) == []
            assert dep.slots == before
