"""DNS-discovered replicas under rolls and bad resolvers: a roll to a name that fails or
hangs, a roll while a replica drains out of DNS, a roll stopped half way, two replicas with
one address, hung and slow lookups, and an unreachable address that stays in DNS."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.dataplane.replicas import ReplicaState
from tests.conftest import gateway_config
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
