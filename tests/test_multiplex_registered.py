"""`ray_serve_registered_multiplexed_model_id` shows the ids loaded now, not every id ever
loaded: a replica churning through many models keeps a bounded scrape."""

from __future__ import annotations

import asyncio

import gateway
from gateway import custom_metrics


class Churn:
    @gateway.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return model_id


def registered(prefix: str) -> list[str]:
    return [line for line in custom_metrics.exposition().splitlines()
            if line.startswith("ray_serve_registered_multiplexed_model_id{")
            and f'model_id="{prefix}' in line]


async def test_unloaded_ids_leave_the_scrape() -> None:
    o = Churn()
    for i in range(300):
        await o.get_model(f"churn-{i}")
    await asyncio.sleep(0.05)  # the evicted models' close tasks
    lines = registered("churn-")
    assert len(lines) == 2
    assert all(line.endswith(" 1.0") for line in lines)
    assert {line.split('model_id="')[1].split('"')[0] for line in lines} == {
        "churn-298", "churn-299"}
