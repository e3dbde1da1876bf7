"""Listener hosts from the config: their bare form, whether one is loopback, how gRPC binds
them, and whether two listeners on one port would collide."""

from __future__ import annotations

import ipaddress

WILDCARDS = ("", "0.0.0.0", "::")


def bare_host(host: str) -> str:
    """`[::1]` -> `::1`: one spelling for comparisons and for binders that take a bare host
    (the Prometheus server); `grpc_address` brackets it again for gRPC."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def is_loopback(host: str) -> bool:
    """A literal loopback address (127.0.0.0/8, ::1, bracketed or not) or the name
    `localhost`; never a name that merely starts like one (`127.evil.example`)."""
    host = bare_host(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_address(host: str, port: int) -> str:
    """`host:port` as gRPC parses it: an IPv6 literal in brackets."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def collide(a: str, b: str) -> bool:
    """Whether listeners on hosts `a` and `b` with the same port would take the same
    socket: the same host, or either on all interfaces (or `localhost` and a loopback
    address it may resolve to)."""
    a, b = bare_host(a), bare_host(b)
    if a == b or a in WILDCARDS or b in WILDCARDS:
        return True
    if "localhost" in (a, b):
        return is_loopback(a) and is_loopback(b)
    return False
