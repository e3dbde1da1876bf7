"""Routing by multiplexed model id (Ray Serve's `multiplexed_model_id`), for one deployment.

A call for model M goes to a replica that holds M (power of two choices among them by calls in
flight); when none does, to the least-loaded replica with room for another model, so a burst
of calls for a new model loads it on one replica, not on all of them at once.

What each replica holds comes from the replica itself (`Replica.mux_models`, reported with its
call results, see gateway/runtime/multiplex.py). Between sending a new model's first call and
that replica's report, the gateway remembers where it placed the model (at most PLACED_S), so
the calls right behind the first one follow it instead of loading M elsewhere too.
"""

from __future__ import annotations

import random
import time
from typing import Protocol

from gateway.dataplane import errors
from gateway.dataplane.replicas import Replica


class Router(Protocol):
    """What affinity reads of a deployment's router (gateway/dataplane/router.py)."""

    replicas: list[Replica]
    max_ongoing: int


MODEL_ID_KEY = "multiplexed_model_id"
MAX_MODEL_ID_LEN = 256
PLACED_S = 30.0
"""How long a placement counts without the replica confirming it (a model's load time)."""
MAX_PLACED = 256
"""Placements waiting for their replica's report: a handful in practice (each lasts one load);
the bound keeps a flood of made-up ids from growing memory or the cost of a pick."""


def valid_model_id(model_id: str) -> bool:
    return 0 < len(model_id) <= MAX_MODEL_ID_LEN and model_id.isprintable()


class ModelAffinity:
    """Per deployment: where models were placed and not yet reported, and the choice."""

    __slots__ = ("_placed", "_rng")

    def __init__(self) -> None:
        self._placed: dict[str, tuple[Replica, float]] = {}
        self._rng = random.Random()

    def holders(self, router: Router, model_id: str) -> list[Replica]:
        """Routable replicas that hold `model_id` (reported, or placed moments ago)."""
        held = [r for r in router.replicas if r.routable and model_id in r.mux_models]
        placed = self._placed.get(model_id)
        if placed is not None:
            rep, until = placed
            if rep in held or until < time.monotonic() or rep not in router.replicas:
                del self._placed[model_id]  # confirmed, expired or gone
            elif rep.routable:
                held.append(rep)
        return held

    def _models_on(self, rep: Replica, now: float) -> int:
        n = len(rep.mux_models)
        for mid, (other, until) in self._placed.items():
            # A placement the replica's report already confirms is counted in its models.
            if other is rep and until >= now and mid not in rep.mux_models:
                n += 1
        return n

    def pick(self, router: Router, model_id: str) -> Replica | None:
        """A replica with room for a call of `model_id`, or None (the call queues)."""
        if not valid_model_id(model_id):
            raise errors.bad_metadata(
                MODEL_ID_KEY, f"must be 1-{MAX_MODEL_ID_LEN} printable characters")
        cap = router.max_ongoing
        held = self.holders(router, model_id)
        free = [r for r in held if r.in_flight < cap]
        if len(free) == 1:
            return free[0]
        if free:
            a, b = self._rng.sample(free, 2)
            return a if a.in_flight <= b.in_flight else b
        placed = self._placed.get(model_id)
        if placed is not None and placed[0] in held:
            # Its first load is under way there (at most PLACED_S, and the call's deadline):
            # wait for that replica rather than load the model on every other one at once.
            return None
        now = time.monotonic()
        spare = [
            r for r in router.replicas
            if r.routable and r.in_flight < cap and r not in held
            and (not r.mux_capacity or self._models_on(r, now) < r.mux_capacity)
        ]
        if not spare and not held:
            # Every replica is full of models: the least loaded evicts its least recently used.
            spare = [r for r in router.replicas if r.routable and r.in_flight < cap]
        if not spare:
            return None  # its holders are busy and no replica has a free model slot: wait
        best = min(spare, key=lambda r: (r.in_flight, self._models_on(r, now)))
        self._place(model_id, best, now)
        return best

    def _place(self, model_id: str, rep: Replica, now: float) -> None:
        placed = self._placed
        if len(placed) >= MAX_PLACED:
            for mid in [m for m, (_, until) in placed.items() if until < now]:
                del placed[mid]
            while len(placed) >= MAX_PLACED:
                del placed[next(iter(placed))]  # the oldest placement
        placed[model_id] = (rep, now + PLACED_S)
