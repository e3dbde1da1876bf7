"""Scraping helpers for the metrics tests: a real HTTP GET of /metrics, parsed."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One scrape: samples by name, labels without the `otel_scope_*` ones every series has."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[Labels, float]] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                labels = frozenset(
                    (k, v) for k, v in s.labels.items() if not k.startswith("otel_scope_")
                )
                self.samples.setdefault(s.name, {})[labels] = s.value

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the series with exactly these labels (None if absent)."""
        return self.series(name).get(frozenset(labels.items()))

    def label_keys(self, name: str) -> set[frozenset[str]]:
        """Every label-key set seen on `name` (one set when the family is consistent)."""
        return {frozenset(k for k, _ in labels) for labels in self.series(name)}

    def where(self, name: str, **match: str) -> dict[Labels, float]:
        """Series of `name` whose labels include `match`."""
        want = set(match.items())
        return {k: v for k, v in self.series(name).items() if want <= k}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
        return body.decode()


async def scrape(gw: Gateway) -> Scrape:
    # Off the loop: the scrape waits for the loop to fetch the replicas' own metrics.
    assert gw.metrics_port
    return Scrape(await asyncio.to_thread(_get, f"http://127.0.0.1:{gw.metrics_port}/metrics"))


async def scrape_until(
    gw: Gateway, ok: Callable[[Scrape], bool], timeout: float = 15.0
) -> Scrape:
    """Scrape until `ok(scrape)` holds; the last scrape is returned either way."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        s = await scrape(gw)
        if ok(s) or loop.time() > end:
            return s
        await asyncio.sleep(0.1)
