"""Re-reading an external replica's client TLS files (`deployments[].tls`).

A channel's credentials are read once, when it is made, so a CA bundle or client certificate
rotated in place would never be used. `ClientFilesWatch` says when to make the channel again:
when one of the files changed (a `stat` per file on the deployment's health-check period) or
after a SIGHUP (`gateway.tls.reload_all`, which bumps `gateway.tls.client_generation()`).
The supervisor then swaps the slot's replica for one with a new channel (gateway/control/
supervisor.py) and closes the old one once its calls are done.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway import tls as tls_mod
from gateway.tls import ClientTLSConfig

OLD_CHANNEL_GRACE_S = 30.0
"""How long calls already on the old channel get before it is closed."""


class ClientFilesWatch:
    """`changed()` is True once per change of the files (or SIGHUP) since the last call."""

    def __init__(self, cfg: ClientTLSConfig | None) -> None:
        self._paths = ([p for p in (cfg.ca_file, cfg.cert_file, cfg.key_file) if p]
                       if cfg is not None else [])
        self._stamp = tls_mod.file_stamp(self._paths)
        self._generation = tls_mod.client_generation()

    def changed(self) -> bool:
        if not self._paths:
            return False
        stamp, gen = tls_mod.file_stamp(self._paths), tls_mod.client_generation()
        if stamp == self._stamp and gen == self._generation:
            return False
        self._stamp, self._generation = stamp, gen
        return True


async def close_when_idle(replica: Any, grace_s: float = OLD_CHANNEL_GRACE_S) -> None:
    """Close a swapped-out replica once no call uses it (at most `grace_s` later)."""
    end = time.monotonic() + grace_s
    while replica.in_flight > 0 and time.monotonic() < end:
        await asyncio.sleep(0.1)
    await replica.close()
