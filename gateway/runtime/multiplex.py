"""Model multiplexing in a local replica, with Ray Serve's API and semantics.

    import gateway

    class Tenants(...Servicer):
        @gateway.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> Model:
            return await load(model_id)

        async def ModelInfer(self, request, context):
            model = await self.get_model(gateway.get_multiplexed_model_id())

The id of a call comes from its `multiplexed_model_id` metadata (Ray's key). Each decorated
loader keeps an LRU cache of at most N models per replica: a cached model is returned as it is;
concurrent first calls for one id share one load; a failing load is not cached and the call
fails with UNAVAILABLE naming the model; an evicted model's `close()` (sync or async) runs, or
else dropping the last reference lets its `__del__` run.

The replica reports the ids it holds with its call results (mux_server.py, models_trailer.py);
metrics: multiplex_metrics.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import grpc

from gateway.runtime import multiplex_metrics
from gateway.runtime.multiplex_metrics import _Metrics

__all__ = [
    "MODEL_ID_KEY",
    "MultiplexedModelError",
    "get_multiplexed_model_id",
    "multiplexed",
]

log = logging.getLogger("gateway.multiplex")

MODEL_ID_KEY = "multiplexed_model_id"
"""The gRPC metadata key that carries a call's model id (Ray Serve's)."""
MAX_MODEL_ID_LEN = 256
MAX_REPORTED = 512
MAX_ERROR_LEN = 500  # a failed load's message in the call's status details, at most
DEFAULT_MAX_MODELS = 3
"""Ray's default for `max_num_models_per_replica`."""

_model_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "gateway_multiplexed_model_id", default=""
)


def get_multiplexed_model_id() -> str:
    """The model id of the call being served (its `multiplexed_model_id` metadata), or ""."""
    return _model_id.get()


def set_model_id(model_id: str) -> contextvars.Token[str]:
    """Set by the replica runtime for the call it runs (mux server or plain gRPC handler)."""
    return _model_id.set(model_id)


def model_id_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == MODEL_ID_KEY:
            return value if isinstance(value, str) else ""
    return ""


class MultiplexedModelError(Exception):
    """A call the multiplexed loader could not serve; answered with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Registry:
    """Every multiplexed cache of this process: what the replica reports to the gateway."""

    def __init__(self) -> None:
        self.caches: list[_ModelCache] = []
        self.version = 0
        """Bumped on every change of the ids held; the mux server reports when it moved."""

    def changed(self) -> None:
        self.version += 1

    def report(self) -> tuple[list[str], int]:
        """(ids loaded or loading, how many this replica may hold; 0 = no limit).

        At most MAX_REPORTED ids (the most recently used), so a replica without a limit
        never makes a result frame too big for the stream."""
        ids: list[str] = []
        cap = 0
        for c in self.caches:
            ids.extend(c.models)
            ids.extend(m for m in c.loading if m not in c.models)
            if c.max_models < 0 or cap < 0:
                cap = -1
            else:
                cap += c.max_models
        if len(ids) > MAX_REPORTED:
            ids = ids[-MAX_REPORTED:]
        return ids, max(cap, 0)


registry = _Registry()


def _loaded_ids() -> list[str]:
    ids = [i for c in list(registry.caches) for i in list(c.models)]
    return ids[-MAX_REPORTED:]


multiplex_metrics.loaded_ids = _loaded_ids


async def _close(model: Any) -> None:
    close = getattr(model, "close", None)
    if close is None or not callable(close):
        return  # dropping our reference lets its __del__ run
    if inspect.iscoroutinefunction(close):
        await close()
    else:
        result = await asyncio.get_running_loop().run_in_executor(None, close)
        if inspect.isawaitable(result):
            await result


SLOT_WAIT_S = 120.0
"""How long a new load waits for a model slot (all held by loads in progress or closing
models) before its callers get UNAVAILABLE."""
CLOSE_TIMEOUT_S = 30.0
"""How long an evicted model's close() holds its slot; after that it is logged and let go."""


class _ModelCache:
    """One decorated loader's models on this replica (for one servicer instance), LRU.

    Capacity: loaded models, loads holding a slot and evicted models whose close() has not
    returned all count, so never more than `max_models` models are live. A new load takes a
    free slot, else evicts the least recently used loaded model (its close() runs in its own
    task and holds the slot until it returns, at most CLOSE_TIMEOUT_S), else waits (at most
    SLOT_WAIT_S) for a slot; a load nobody waits for any more gives its slot up."""

    def __init__(self, load: Callable[[str], Awaitable[Any]], max_models: int) -> None:
        self._load = load
        self.max_models = max_models
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Task[Any]] = {}
        self._waiters: dict[str, int] = {}  # callers awaiting each load in progress
        self._slotted: set[str] = set()  # loads in progress that hold a slot
        self.closing: dict[str, asyncio.Task[None]] = {}  # close()s holding their slot
        self._slot_wanted = self._seq = 0
        self._freed: asyncio.Event | None = None
        self._metrics = _Metrics.get()
        registry.caches.append(self)

    def live(self) -> int:
        return len(self.models) + len(self._slotted) + len(self.closing)

    async def get(self, model_id: Any) -> Any:
        m = self._metrics
        m.requests.add(1, m.attrs)
        if not isinstance(model_id, str) or not model_id:
            raise MultiplexedModelError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this deployment serves multiplexed models: set the {MODEL_ID_KEY!r} "
                "metadata to the model id",
            )
        if len(model_id) > MAX_MODEL_ID_LEN or not model_id.isprintable():
            raise MultiplexedModelError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{MODEL_ID_KEY} must be 1-{MAX_MODEL_ID_LEN} printable characters",
            )
        model = self.models.get(model_id, _MISSING)
        if model is not _MISSING:
            self.models.move_to_end(model_id)
            return model
        task = self.loading.get(model_id)
        if task is None:
            # Its own task: a caller that goes away does not cancel the load the others await.
            task = asyncio.ensure_future(self._load_one(model_id))
            task.add_done_callback(functools.partial(self._load_done, model_id))
            self.loading[model_id] = task
            self._waiters[model_id] = 0
            registry.changed()
        self._waiters[model_id] = self._waiters.get(model_id, 0) + 1
        try:
            return await asyncio.shield(task)
        except MultiplexedModelError:
            raise
        except asyncio.CancelledError:
            if task.cancelled():  # the replica is stopping, or the load was given up
                raise MultiplexedModelError(
                    grpc.StatusCode.UNAVAILABLE, f"loading model {model_id!r} was cancelled"
                ) from None
            raise
        finally:
            left = self._waiters.get(model_id)
            if left is not None and self.loading.get(model_id) is task:
                self._waiters[model_id] = left - 1
                if left == 1 and model_id not in self._slotted and not task.done():
                    task.cancel()  # still waiting for a slot, and nobody wants it any more

    def _load_done(self, model_id: str, task: asyncio.Task[Any]) -> None:
        if not task.cancelled():  # seen: a failed load whose callers left is not asyncio's
            task.exception()      # "Task exception was never retrieved" (we log it)
        if self.loading.get(model_id) is task:  # cancelled before it ran: no finally ran
            del self.loading[model_id]
            self._waiters.pop(model_id, None)
            registry.changed()

    def _slot_freed(self) -> None:
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    def _evict_lru(self) -> None:
        model_id, model = self.models.popitem(last=False)
        registry.changed()
        m = self._metrics
        m.num_models.set(len(self.models), m.attrs)
        self._seq += 1
        key = f"{self._seq}\0{model_id}"
        self.closing[key] = asyncio.ensure_future(self._unload(key, model_id, model))
        log.info("multiplexed model %r unloaded (least recently used)", model_id)

    async def _unload(self, key: str, model_id: str, model: Any) -> None:
        m = self._metrics
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(_close(model), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.error("close() of multiplexed model %r did not return within %g s: "
                      "its slot is given to the next model", model_id, CLOSE_TIMEOUT_S)
        except Exception:
            log.exception("closing multiplexed model %r failed", model_id)
        finally:
            del model
            self.closing.pop(key, None)
            self._slot_freed()
        m.unload_latency.record((time.perf_counter() - t0) * 1000.0, m.attrs)
        m.unloads.add(1, m.attrs)

    async def _take_slot(self, model_id: str) -> None:
        if self.max_models < 0:
            self._slotted.add(model_id)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOT_WAIT_S
        self._slot_wanted += 1
        try:
            while True:
                if self.live() < self.max_models:
                    self._slotted.add(model_id)
                    return
                # Frees on the way (closes) serve the loads already waiting; evict for the rest.
                if self.models and len(self.closing) < self._slot_wanted:
                    self._evict_lru()
                    continue
                orphans = [i for i in self._slotted if self._waiters.get(i, 0) == 0]
                if orphans and len(self.closing) < self._slot_wanted:
                    log.warning("loading multiplexed model %r given up: no caller waits for it "
                                "and model %r needs its slot", orphans[0], model_id)
                    self.loading[orphans[0]].cancel()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise MultiplexedModelError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"no slot for multiplexed model {model_id!r} within {SLOT_WAIT_S:g} s: "
                        f"all {self.max_models} slots of this replica are loading or unloading "
                        "models; retry later",
                    )
                if self._freed is None:
                    self._freed = asyncio.Event()
                try:
                    await asyncio.wait_for(self._freed.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self._slot_wanted -= 1

    async def _load_one(self, model_id: str) -> Any:
        m = self._metrics
        try:
            await self._take_slot(model_id)
            t0 = time.perf_counter()
            try:
                model = await self._load(model_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # One line, bounded: it becomes the call's status details and a log line.
                why = " ".join(str(e).split())
                if len(why) > MAX_ERROR_LEN:
                    why = why[:MAX_ERROR_LEN] + "..."
                log.warning("loading multiplexed model %r failed: %s: %s",
                            model_id, type(e).__name__, why)
                raise MultiplexedModelError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"multiplexed model {model_id!r} failed to load: {type(e).__name__}: {why}",
                ) from e
            m.load_latency.record((time.perf_counter() - t0) * 1000.0, m.attrs)
            m.loads.add(1, m.attrs)
            self.models[model_id] = model
            m.num_models.set(len(self.models), m.attrs)
            return model
        finally:
            self.loading.pop(model_id, None)
            self._waiters.pop(model_id, None)
            self._slotted.discard(model_id)
            self._slot_freed()  # a slot freed, or a model loaded that a waiting load may evict
            registry.changed()


_MISSING = object()


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@overload
def multiplexed(func: F, *, max_num_models_per_replica: int = ...) -> F: ...


@overload
def multiplexed(
    func: None = None, *, max_num_models_per_replica: int = ...
) -> Callable[[F], F]: ...


def multiplexed(
    func: Callable[..., Awaitable[Any]] | None = None,
    *,
    max_num_models_per_replica: int = DEFAULT_MAX_MODELS,
) -> Any:
    """Decorate an async loader `(self, model_id)` or `(model_id)`: Ray Serve's `@multiplexed`.

    The decorated function returns the model for `model_id` (the call's id when omitted),
    from the cache or loaded once; `max_num_models_per_replica=-1` means no limit.
    """
    n = max_num_models_per_replica
    if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
        raise ValueError(
            f"max_num_models_per_replica must be a positive integer or -1, got {n!r}"
        )

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Any:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@multiplexed needs an async function; {fn.__qualname__} is not")
        params = list(inspect.signature(fn).parameters)
        if len(params) not in (1, 2):
            raise TypeError(
                f"@multiplexed loader {fn.__qualname__} must take (self, model_id) or (model_id)"
            )
        is_method = len(params) == 2
        attr = f"_gateway_multiplex_{fn.__name__}"
        module_cache: list[_ModelCache] = []

        def cache_of(owner: Any) -> _ModelCache:
            if owner is None:
                if not module_cache:
                    module_cache.append(_ModelCache(fn, n))
                return module_cache[0]
            c: _ModelCache | None = owner.__dict__.get(attr)
            if c is None:
                c = _ModelCache(functools.partial(fn, owner), n)
                owner.__dict__[attr] = c
            return c

        if is_method:
            @functools.wraps(fn)
            async def method(self: Any, model_id: str | None = None) -> Any:
                mid = get_multiplexed_model_id() if model_id is None else model_id
                return await cache_of(self).get(mid)

            method._gateway_multiplexed = n  # type: ignore[attr-defined]
            _used.append((fn.__module__, n, True))
            return method

        @functools.wraps(fn)
        async def function(model_id: str | None = None) -> Any:
            mid = get_multiplexed_model_id() if model_id is None else model_id
            return await cache_of(None).get(mid)

        function._gateway_multiplexed = n  # type: ignore[attr-defined]
        function._gateway_function_loader = True  # type: ignore[attr-defined]
        _used.append((fn.__module__, n, False))
        return function

    return decorate(func) if func is not None else decorate


_used: list[tuple[str, int, bool]] = []
"""(module, max_num_models_per_replica, is a method) of every loader decorated here."""


def _function_loaders(modules: set[str]) -> list[int]:
    """The caps of function loaders defined in, or imported by name or module into, `modules`
    (a servicer's module calling `load_model` of its own `loaders.py`, a common layout)."""
    import sys
    import types

    caps: dict[int, int] = {}
    for name in modules:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for value in list(vars(mod).values()):
            candidates = [value]
            if isinstance(value, types.ModuleType):
                candidates = list(vars(value).values())
            for v in candidates:
                n = getattr(v, "_gateway_multiplexed", None) if callable(v) else None
                if isinstance(n, int) and getattr(v, "_gateway_function_loader", False):
                    caps[id(v)] = n
    return list(caps.values())


def declared_capacity(servicer_class: type) -> int | None:
    """What the replica tells the gateway at start: None (its servicer serves no multiplexed
    models), 0 (no limit) or how many models it may hold: from the class's decorated loader
    methods, else from function loaders the modules of its classes define or import. Decorators
    run when the module is imported, before the replica serves."""
    caps = [
        v._gateway_multiplexed
        for klass in servicer_class.__mro__ for v in vars(klass).values()
        if hasattr(v, "_gateway_multiplexed")
    ]
    if not caps:
        caps = [n for mod, n, method in _used if not method and mod == servicer_class.__module__]
    if not caps:
        caps = _function_loaders({k.__module__ for k in servicer_class.__mro__
                                  if k.__module__ != "builtins"})
    if not caps:
        return None
    return 0 if -1 in caps else sum(caps)
