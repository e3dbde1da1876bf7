"""Replica handles: one upstream address, its channel, its load and its state.

The proxy talks to a replica only through `Replica.callable(...)`, so the way calls reach a
replica (the mux stream to a local replica, or one gRPC call each) stays behind one
interface.
"""

from __future__ import annotations

import enum
import functools
import logging
import secrets
import time
from typing import Any

import grpc

from gateway.control.auth import ControlChannel
from gateway.dataplane.mux import MuxChannel
from gateway.tls import ClientTLS, ClientTLSConfig, TLSError


class ReplicaState(enum.StrEnum):
    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    UNHEALTHY = "UNHEALTHY"


ROUTABLE = frozenset({ReplicaState.RUNNING, ReplicaState.UPDATING})
"""States in which a replica gets calls (UPDATING: it serves while it takes a new config)."""


def replica_tag(app: str, deployment: str) -> str:
    """A replica id in Ray's `app#Deployment#suffix` shape."""
    return f"{app}#{deployment}#{secrets.token_hex(3)}"


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Retries are the gateway's decision (it knows the other replicas), not the channel's.
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 30_000),
        # Reconnect quickly after a replica restarts on the same address.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


log = logging.getLogger("gateway.replicas")


def _channel(address: str, max_message_bytes: int, tls: ClientTLSConfig | None,
             replica_id: str) -> grpc.aio.Channel:
    options = channel_options(max_message_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    try:
        client = ClientTLS(tls, "tls")
        creds, options = client.credentials, [*options, *client.options()]
    except TLSError as e:
        # Checked at deploy; files gone since. Fail closed: the system roots will not verify
        # a private CA, so the health check reports the handshake failure. Never plaintext.
        log.error("replica %s: %s; using the system CA roots", replica_id, e)
        creds = grpc.ssl_channel_credentials()
    return grpc.aio.secure_channel(address, creds, options=options)


_SHAPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class Replica:
    """A routable replica. `in_flight` is owned by the router; the state by the controller."""

    __slots__ = (
        "_bare",
        "_callables",
        "_mux",
        "address",
        "application",
        "channel",
        "deployment",
        "in_flight",
        "is_local",
        "message",
        "mux_capacity",
        "mux_models",
        "mux_report",
        "pid",
        "replica_id",
        "started_at",
        "state",
    )

    def __init__(
        self,
        application: str,
        deployment: str,
        replica_id: str,
        address: str,
        max_message_bytes: int,
        is_local: bool,
        mux: bool = False,
        control_secret: str | None = None,
        tls: ClientTLSConfig | None = None,
    ) -> None:
        self.application = application
        self.deployment = deployment
        self.replica_id = replica_id
        self.address = address
        self.is_local = is_local
        self.message = ""
        self._bare = _channel(address, max_message_bytes, tls, replica_id)
        # A local replica's control service wants its secret (gateway/control/auth.py); data
        # calls (callable below) use the bare channel and pay nothing for it.
        self.channel: grpc.aio.Channel = (
            self._bare if control_secret is None else ControlChannel(self._bare, control_secret)
        )
        self.in_flight = 0
        self.state = ReplicaState.STARTING
        self.pid: int | None = None
        self.started_at = time.time()
        self._callables: dict[tuple[str, int], Any] = {}
        self.mux_models: frozenset[str] = frozenset()
        """Multiplexed model ids the replica holds or is loading, as it last reported."""
        self.mux_capacity: int | None = None
        """How many models it may hold (0: no limit); None when it serves no multiplexed
        models (gateway/runtime/multiplex.py). Set from its start report and its results."""
        self.mux_report = ""
        """The last models report read from a plain call's trailers (dataplane/models_report)."""
        # Local replicas run our runtime, which speaks the mux protocol (see mux.py).
        self._mux = MuxChannel(self.channel, max_message_bytes) if mux else None
        if self._mux is not None:
            self._mux.on_models = self._on_models

    def _on_models(self, models: Any, capacity: int | None) -> None:
        """The replica's report of its multiplexed models (None: the stream ended)."""
        self.mux_models = frozenset(models) if models is not None else frozenset()
        if capacity is not None:
            self.mux_capacity = capacity

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE

    def callable(self, path: str, shape: int) -> Any:
        """A cached bytes-in/bytes-out multi-callable for `path` (shape: index in _SHAPES)."""
        key = (path, shape)
        mc = self._callables.get(key)
        if mc is None:
            if shape == 0 and self._mux is not None:
                mc = functools.partial(self._mux.unary, path)
            else:
                # No serializers: request and response bytes pass through untouched.
                mc = getattr(self._bare, _SHAPES[shape])(path)
            if len(self._callables) < 4096:
                self._callables[key] = mc
        return mc

    async def close(self) -> None:
        self._callables.clear()
        if self._mux is not None:
            await self._mux.close()
        await self.channel.close(grace=None)

    def __repr__(self) -> str:
        return (
            f"Replica({self.replica_id} @ {self.address} {self.state} in_flight={self.in_flight})"
        )


UNARY_UNARY, UNARY_STREAM, STREAM_UNARY, STREAM_STREAM = range(4)
