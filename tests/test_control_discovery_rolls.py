"""DNS-discovered replicas under rolls and bad resolvers: a roll to a name that fails or
hangs, a roll while a replica drains out of DNS, a roll stopped half way, two replicas with
one address, hung and slow lookups, and an unreachable address that stays in DNS."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import ConfigError, parse_config
from gateway.control import discovery as discovery_mod
from gateway.dataplane.replicas import ReplicaState
from gateway.pb.text_model_pb2 import PredictRequest
from tests.conftest import gateway_config, md, text_stub
from tests.metrics_util import scrape_until
from tests.test_control_discovery import NAME, FakeDNS, gateway, servers, slots, until


def config(tmp: Path, targets: list[str], **dep: Any) -> Any:
    return gateway_config([{"name": "text", "deployments": [{
        "name": "Remote", "targets": targets, "health_check_period_s": 0.2,
        "dns_refresh_s": 0.3, **dep}]}], tmp)


def by_target(gw: Any) -> dict[str | None, ReplicaState]:
    return {s.target: s.state for _, s in gw.controller.slots()}


class HangingDNS(FakeDNS):
    """FakeDNS that can hang (a dead DNS server) before it answers or fails."""

    def __init__(self) -> None:
        super().__init__()
        self.hang_s = 0.0

    async def resolve(self, host: str, port: int) -> list[str]:
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        return await super().resolve(host, port)


@pytest.mark.parametrize("trouble", ["error", "empty", "hang"])
async def test_roll_to_a_name_that_does_not_resolve_keeps_the_serving_replicas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trouble: str,
) -> None:
    monkeypatch.setattr(discovery_mod, "ROLL_LOOKUP_TIMEOUT_S", 0.5, raising=False)
    dns = HangingDNS()
    async with servers("S") as srv:
        static = srv[0][2]
        async with gateway(tmp_path, dns) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            assert await gw.apply(config(tmp_path, [static])) == []
            await until(lambda: by_target(gw) == {static: ReplicaState.RUNNING})
            if trouble == "error":
                dns.error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name "
                                            "resolution")
            elif trouble == "hang":
                dns.hang_s = 30
            problems = await asyncio.wait_for(gw.apply(config(tmp_path, [NAME])), 5)
            want = {"error": "Temporary failure in name resolution",
                    "empty": "resolves to no address", "hang": "timed out"}[trouble]
            assert len(problems) == 1 and want in problems[0] and "not started" in problems[0]
            assert by_target(gw) == {static: ReplicaState.RUNNING}
            dep = gw.controller.apps["text"].deployments["Remote"]
            assert gw.controller.apps["text"].status == "DEPLOY_FAILED"
            assert want in dep.message
            r = await text_stub(ch).Predict(PredictRequest(text="good"), metadata=md(),
                                            timeout=5)
            assert r.label == "S"


async def test_roll_while_a_replica_drains_out_of_dns(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A", "B", "C", "S") as srv:
        (_, _, a), (_, _, b), (_, _, c), (_, _, s) = srv
        dns.answer = [a, b]
        async with gateway(tmp_path, dns, max_ongoing_requests=1,
                           graceful_shutdown_timeout_s=10) as gw, \
                grpc.aio.insecure_channel(gw.address) as ch:
            await until(lambda: len(slots(gw)) == 2
                        and all(st is ReplicaState.RUNNING for st in slots(gw).values()))
            dep = gw.controller.apps["text"].deployments["Remote"]
            stub = text_stub(ch)
            # One long call on each replica (max_ongoing_requests=1): B drains slowly.
            calls = [asyncio.ensure_future(stub.Predict(
                PredictRequest(text="x", sleep_s=2), metadata=md(), timeout=20))
                for _ in range(2)]
            await until(lambda: sum(x.replica.in_flight for x in dep.slots
                                    if x.replica is not None) == 2, what="both busy")
            dns.answer = [a]
            await until(lambda: any(x.stopping for x in dep.slots), what="B draining")
            assert await gw.apply(config(tmp_path, [NAME, s], max_ongoing_requests=1,
                                         graceful_shutdown_timeout_s=10)) == []
            assert all(not isinstance(r, BaseException)
                       for r in await asyncio.gather(*calls, return_exceptions=True))
            assert gw.controller.discovery.names(dep) == [NAME]
            await until(lambda: sorted(x.target or "" for x in dep.slots) == sorted([a, s]),
                        what="A and S")
            # Ids stay unique although the roll started a second replica for A's address.
            ids = [x.replica_id for x in dep.slots]
            assert len(set(ids)) == len(ids)
            dns.answer = [a, c]  # discovery still runs
            await until(lambda: c in [x.target for x in dep.slots], what="C added")


async def test_a_stopped_roll_to_a_name_keeps_following_the_name(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A", "C", "S") as srv:
        (_, _, a), (_, _, c), (_, _, s) = srv
        async with gateway(tmp_path, dns) as gw:
            assert await gw.apply(config(tmp_path, [s])) == []
            await until(lambda: by_target(gw) == {s: ReplicaState.RUNNING})
            dns.answer = [a, "127.0.0.1:1"]  # the second address is down
            problems = await gw.apply(config(tmp_path, [NAME]))
            assert problems and "roll stopped" in problems[0]
            dep = gw.controller.apps["text"].deployments["Remote"]
            assert gw.controller.discovery.names(dep) == [NAME]
            dns.answer = [c]  # A leaves DNS: it drains, C joins
            await until(lambda: slots(gw) == {c: ReplicaState.RUNNING}, what="only C")


def test_two_spellings_of_one_name_are_one_target() -> None:
    for other in ("dns:///MODELS.test.internal:50051", "dns:///models.test.internal.:50051",
                  "dns:///models.test.internal:050051"):
        with pytest.raises(ConfigError, match="listed twice"):
            parse_config({"applications": [{"name": "a", "deployments": [{
                "name": "D", "targets": [NAME, other]}]}]})


async def test_one_address_twice_keeps_two_health_series(tmp_path: Path) -> None:
    """A roll that keeps a name starts the new replica for an address before the old one
    leaves: two slots of one address, two ids, each with its own health gauge."""
    dns = FakeDNS()
    async with servers("A") as srv:
        a = srv[0][2]
        dns.answer = [a]
        async with gateway(tmp_path, dns) as gw:
            await until(lambda: slots(gw) == {a: ReplicaState.RUNNING})
            dep = gw.controller.apps["text"].deployments["Remote"]
            second = gw.controller._new_slot(dep, a, NAME)
            assert second.replica_id != a
            await until(lambda: second.state is ReplicaState.RUNNING)
            want = {a, second.replica_id}
            got = await scrape_until(gw, lambda s: want <= {
                dict(k).get("replica") for k in s.series("ray_serve_deployment_replica_healthy")})
            assert want <= {dict(k).get("replica")
                            for k in got.series("ray_serve_deployment_replica_healthy")}


async def test_hung_lookups_do_not_take_asyncio_default_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: release.wait(10) and [])
    d = discovery_mod.Discovery(lambda *a: None, None)  # type: ignore[arg-type]
    lookups = [asyncio.ensure_future(d.resolve(f"h{i}.invalid", 1)) for i in range(12)]
    try:
        await asyncio.sleep(0.2)
        # Twelve hung lookups, and the default executor still runs work at once.
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 7), 2) == 7
        dns_threads = [t for t in threading.enumerate() if t.name.startswith("gateway-dns")]
        assert len(dns_threads) == getattr(discovery_mod, "LOOKUP_THREADS", 4)
    finally:
        release.set()
        await asyncio.gather(*lookups, return_exceptions=True)
        await d.close()


async def test_a_slow_failing_lookup_reports_its_real_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(discovery_mod, "LOOKUP_TIMEOUT_S", 0.3)
    dns = HangingDNS()
    dns.hang_s = 0.6  # longer than the timeout, then it fails
    dns.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    seen: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    with caplog.at_level(logging.WARNING):
        async with gateway(tmp_path, dns) as gw:
            dep = gw.controller.apps["text"].deployments["Remote"]
            await until(lambda: "Name or service not known" in dep.message, timeout=10,
                        what="the real cause in the status")
    import gc

    gc.collect()
    await asyncio.sleep(0.1)
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))], seen


async def test_a_lookup_stuck_for_good_does_not_hold_later_refreshes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery_mod, "LOOKUP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(discovery_mod, "ABANDON_LOOKUP_S", 0.5, raising=False)
    async with servers("A") as srv:
        a = srv[0][2]
        calls = 0

        async def resolve(host: str, port: int) -> list[str]:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(3600)  # never answers
            return [a]

        dns = FakeDNS()
        dns.resolve = resolve  # type: ignore[method-assign]
        async with gateway(tmp_path, dns) as gw:
            await until(lambda: slots(gw) == {a: ReplicaState.RUNNING}, timeout=10,
                        what="a later lookup answered")


async def test_unreachable_address_in_dns_backs_off_its_lookups(tmp_path: Path) -> None:
    dns = FakeDNS()
    async with servers("A") as srv:
        dns.answer = [srv[0][2], "127.0.0.1:1"]  # the second one stays in DNS, unreachable
        async with gateway(tmp_path, dns, dns_refresh_s=60) as gw:
            await until(lambda: len(slots(gw)) == 2)
            before = dns.lookups
            t0 = time.monotonic()
            await asyncio.sleep(7.5)
            # Kicked lookups back off 1, 2, 4 s ... (not one a second: 7 or 8 here).
            assert dns.lookups - before <= 4, (dns.lookups - before, time.monotonic() - t0)
