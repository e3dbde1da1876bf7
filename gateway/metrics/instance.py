"""Which gateway instance this is, for metrics pushed over OTLP.

Several gateways with the same config are equivalent and do not coordinate; their metric
series must still be told apart and summed. Prometheus scrapes each one and adds `instance`
(the scraped address) itself. Pushed metrics carry the OpenTelemetry resource attribute
`service.instance.id` instead: `GATEWAY_INSTANCE_ID` when set (the pod name, from the
Kubernetes downward API in deploy/kubernetes/), else `<hostname>:<pid>`, which is unique
among the gateways of one machine and across machines.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

ENV_INSTANCE_ID = "GATEWAY_INSTANCE_ID"


def instance_id(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    given = env.get(ENV_INSTANCE_ID, "").strip()
    if given and given.isprintable() and len(given) <= 256:
        return given
    return f"{socket.gethostname()}:{os.getpid()}"
