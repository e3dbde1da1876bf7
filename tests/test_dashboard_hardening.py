"""Regression tests for the dashboard's hardening (issue 14's review): the Host guard, slow and
many clients, the log search and its bounds, forged log lines, the replica's print capture and
the login helpers."""

from __future__ import annotations

import pytest

from gateway.dashboard import auth


@pytest.mark.parametrize("host", [
    "127.evil.example", "127.0.0.1.evil.example:8265", "127.attacker.test", "127.1.evil",
    "localhost.evil.example", "0x7f.evil", "[::1].evil",
])
def test_host_guard_refuses_names_that_only_look_loopback(host: str) -> None:
    assert not auth.host_ok(host, "127.0.0.1")


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.0.0.1:8265", "127.1.2.3:80", "localhost:8265", "LOCALHOST", "[::1]:8265",
    "[::ffff:127.0.0.1]:1",
])
def test_host_guard_accepts_loopback_literals_and_localhost(host: str) -> None:
    assert auth.host_ok(host, "127.0.0.1")


def test_host_guard_accepts_the_configured_host() -> None:
    assert auth.host_ok("dash.internal:8265", "dash.internal")
    assert not auth.host_ok("other.internal:8265", "dash.internal")
