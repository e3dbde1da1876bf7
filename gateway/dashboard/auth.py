"""Who may see the dashboard: the admin token (header or login cookie), and loopback Host names.

With `admin.token` set, a request needs `Authorization: Bearer <token>` or the session cookie
the login form sets. The cookie holds an HMAC of the token, not the token, and every compare
is constant-time. Without a token the dashboard only binds loopback (the config insists), and
it answers only requests whose Host names a loopback address: a web page elsewhere cannot read
it through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

COOKIE = "gateway_dashboard"


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"grpc-gateway dashboard session", hashlib.sha256).hexdigest()


def token_ok(token: str, offered: str) -> bool:
    return hmac.compare_digest(token.encode(), offered.encode())


def authorized(token: str | None, header: str, cookie: str) -> bool:
    if token is None:
        return True
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value and token_ok(token, value.strip()):
        return True
    return bool(cookie) and hmac.compare_digest(session_value(token).encode(), cookie.encode())


def host_ok(host_header: str, bound_host: str) -> bool:
    """Whether a Host header names this loopback dashboard (no token: DNS-rebinding guard)."""
    try:
        name = urlsplit("//" + host_header).hostname or ""
    except ValueError:
        return False
    if not name:
        return False
    if name == "localhost" or name == bound_host.strip("[]").lower():
        return True
    try:  # only an IP literal that is loopback: `127.evil.example` is a DNS name
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this site only (no `//evil`, no scheme)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
