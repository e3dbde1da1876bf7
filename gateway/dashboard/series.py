"""The dashboard's live charts: calls/s, errors/s by code and latency quantiles, in process.

A proxy observer counts each finished call into the current interval of its (application,
deployment): a dict lookup, two increments and one `bisect` (no allocation once the route has
been seen). Every `step_s` the control loop closes the interval into one point per deployment
and per application, kept in a ring of `window_s / step_s` points (15 minutes by default). So
memory is bounded by the configured deployments, and reading the charts never touches the
call path.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from gateway.dataplane.proxy import CallRecord

STEP_S = 2.0
WINDOW_S = 15 * 60.0
MAX_ROUTES = 1000
"""Deployments followed at most (routes come from the config, this only bounds a mistake)."""

# Geometric bucket bounds in ms, 0.02 ms to ~10 min, 15% apart: a quantile is off by < 8%.
BOUNDS_MS: tuple[float, ...] = tuple(0.02 * 1.15 ** i for i in range(130))
OK = grpc.StatusCode.OK


class _Interval:
    """What one deployment did since the last point."""

    __slots__ = ("errors", "hist", "n")

    def __init__(self) -> None:
        self.n = 0
        self.errors: dict[str, int] = {}
        self.hist = [0] * (len(BOUNDS_MS) + 1)

    def add(self, other: _Interval) -> None:
        self.n += other.n
        for code, v in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + v
        for i, v in enumerate(other.hist):
            if v:
                self.hist[i] += v


def quantile(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms of a bucket histogram, interpolated inside its bucket."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, v in enumerate(hist):
        if v and seen + v >= rank:
            lo = BOUNDS_MS[i - 1] if i > 0 else 0.0
            hi = BOUNDS_MS[i] if i < len(BOUNDS_MS) else BOUNDS_MS[-1]
            return lo + (hi - lo) * max(0.0, min(1.0, (rank - seen) / v))
        seen += v
    return BOUNDS_MS[-1]


@dataclass
class Point:
    t: float
    """End of the interval (unix seconds)."""
    calls_per_s: float
    errors_per_s: dict[str, float]
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {"t": round(self.t, 3), "calls_per_s": round(self.calls_per_s, 4),
                "errors_per_s": {k: round(v, 4) for k, v in self.errors_per_s.items()},
                "p50_ms": r(self.p50_ms), "p90_ms": r(self.p90_ms), "p99_ms": r(self.p99_ms)}


@dataclass
class _Ring:
    points: deque[Point] = field(default_factory=deque)


class CallSeries:
    """`observe` is the proxy observer; `sample()` closes an interval (the control loop calls
    it every `step_s`); `points(app, deployment)` reads a chart."""

    def __init__(self, step_s: float = STEP_S, window_s: float = WINDOW_S) -> None:
        self.step_s = step_s
        self.window_s = window_s
        self._maxlen = max(1, math.ceil(window_s / step_s))
        self._current: dict[tuple[str, str], _Interval] = {}
        self._rings: dict[tuple[str, str], deque[Point]] = {}
        """(app, deployment) and (app, "") for the application's sum."""
        self._last_sample = time.monotonic()
        self._next_due = self._last_sample + step_s

    # -- the call path ------------------------------------------------------------------

    def observe(self, rec: CallRecord) -> None:
        """Count one finished call (runs on the loop, once per call: keep it small)."""
        if not rec.application:
            return  # no application: nothing to chart it under (the metrics count it)
        key = (rec.application, rec.deployment)
        cur = self._current.get(key)
        if cur is None:
            if len(self._current) >= MAX_ROUTES:
                return
            cur = self._current[key] = _Interval()
        cur.n += 1
        if rec.code is not OK:
            name = rec.code.name
            cur.errors[name] = cur.errors.get(name, 0) + 1
        cur.hist[bisect_left(BOUNDS_MS, rec.latency_s * 1000.0)] += 1

    # -- the control loop ---------------------------------------------------------------

    def tick(self, routes: Callable[[], list[tuple[str, str]]]) -> None:
        """Close the interval when one is due; `routes()` names the deployments that exist
        now (they get a zero point when idle, so their charts keep moving)."""
        now = time.monotonic()
        if now >= self._next_due:
            self.sample(routes(), now)

    def sample(self, routes: list[tuple[str, str]], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(1e-3, now - self._last_sample)
        self._last_sample = now
        self._next_due = now + self.step_s
        current, self._current = self._current, {}
        wall = time.time()
        apps: dict[str, _Interval] = {}
        keys = dict.fromkeys([*routes, *current])
        for key in keys:
            iv = current.get(key) or _Interval()
            apps.setdefault(key[0], _Interval()).add(iv)
            self._push(key, _point(iv, elapsed, wall))
        for app, iv in apps.items():
            self._push((app, ""), _point(iv, elapsed, wall))
        # Routes gone (an application removed) stop growing; forget them once a window old.
        live = {*keys, *((a, "") for a in apps)}
        for key in [k for k, ring in self._rings.items()
                    if k not in live and (not ring or ring[-1].t < wall - self.window_s)]:
            del self._rings[key]

    def _push(self, key: tuple[str, str], point: Point) -> None:
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= 2 * MAX_ROUTES:
                return
            ring = self._rings[key] = deque(maxlen=self._maxlen)
        ring.append(point)

    # -- readers ------------------------------------------------------------------------

    def points(self, application: str, deployment: str = "") -> list[Point]:
        return list(self._rings.get((application, deployment), ()))


def _point(iv: _Interval, elapsed: float, wall: float) -> Point:
    return Point(
        t=wall,
        calls_per_s=iv.n / elapsed,
        errors_per_s={code: v / elapsed for code, v in sorted(iv.errors.items())},
        p50_ms=quantile(iv.hist, 0.50),
        p90_ms=quantile(iv.hist, 0.90),
        p99_ms=quantile(iv.hist, 0.99),
    )
