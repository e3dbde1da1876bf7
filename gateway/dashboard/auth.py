"""Who may see the dashboard: the admin token (header or login cookie), and loopback Host names.

With `admin.token` set, a request needs `Authorization: Bearer <token>` or the session cookie
the login form sets. The cookie holds its issue time and an HMAC of it under the token (not
the token), lasts `SESSION_TTL_S`, and every compare is constant-time; failed logins are
limited for all clients together. Without a token the dashboard only binds loopback (the
config insists), and it answers only requests whose Host names a loopback address (an IP
literal, `localhost` or the configured host): a web page elsewhere cannot read it through DNS
rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections import deque
from collections.abc import Callable

COOKIE = "gateway_dashboard"
SESSION_TTL_S = 12 * 3600
"""How long a login lasts: the cookie carries its issue time (signed) and expires after this."""
FAILED_LOGINS = 10
FAILED_LOGINS_WINDOW_S = 60.0
"""At most this many failed logins per window, from all clients together (then 429)."""


def _mac(token: str, issued: int) -> str:
    msg = b"grpc-gateway dashboard session " + str(issued).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def session_value(token: str, now: float | None = None) -> str:
    """The login cookie: its issue time and an HMAC of it under the token (not the token)."""
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_mac(token, issued)}"


def session_ok(token: str, cookie: str, now: float | None = None) -> bool:
    issued_s, _, mac = cookie.partition(".")
    if not issued_s.isdigit() or len(issued_s) > 12 or not mac:
        return False
    issued = int(issued_s)
    age = (time.time() if now is None else now) - issued
    if not -60 <= age <= SESSION_TTL_S:  # expired, or issued in the future
        return False
    return hmac.compare_digest(_mac(token, issued).encode(), mac.encode())


def token_ok(token: str, offered: str) -> bool:
    return hmac.compare_digest(token.encode(), offered.encode())


def authorized(token: str | None, header: str, cookie: str) -> bool:
    if token is None:
        return True
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value and token_ok(token, value.strip()):
        return True
    return bool(cookie) and session_ok(token, cookie)


class FailedLogins:
    """A global limit on failed logins (a guesser with many connections gets no more tries
    than one): `allow()` before checking a token, `failed()` after a wrong one."""

    def __init__(self, limit: int = FAILED_LOGINS, window_s: float = FAILED_LOGINS_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque(maxlen=limit)

    def allow(self) -> bool:
        now = self._clock()
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        return len(self._times) < self.limit

    def failed(self) -> None:
        self._times.append(self._clock())

    def retry_after_s(self) -> int:
        if not self._times:
            return 0
        return max(1, int(self.window_s - (self._clock() - self._times[0])) + 1)


def host_ok(host_header: str, bound_host: str) -> bool:
    """Whether a Host header names this loopback dashboard (no token: DNS-rebinding guard)."""
    name = _host_name(host_header)
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


def _host_name(host_header: str) -> str:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lower case; ""
    for anything else (`[::1].evil`, two colons outside brackets, a bad port)."""
    host, port = host_header.strip().lower(), ""
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return ""
        port = rest[1:]
    else:
        name, _, port = host.partition(":")
        if ":" in port:
            return ""
    if port and not (port.isdigit() and len(port) <= 5):
        return ""
    return name


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this site only (no `//evil`, no scheme)."""
    # Browsers drop tabs and newlines from a URL (`/\t/evil` becomes `//evil`): no control
    # characters or whitespace at all.
    if any(c.isspace() or not c.isprintable() for c in target):
        return "/"
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
