"""gRPC observability gateway for model serving."""

__version__ = "0.1.0"

# `gateway.status(address)` returns what `gateway status` prints, as dataclasses. Imported
# eagerly so `import gateway` is enough.
from typing import Any

from gateway.admin.status import GatewayStatus, status

__all__ = [
    "GatewayStatus", "__version__", "get_multiplexed_model_id", "multiplexed", "status",
]

_LAZY = {"multiplexed", "get_multiplexed_model_id"}


def __getattr__(name: str) -> Any:
    # Model multiplexing for model code (gateway/runtime/multiplex.py), imported on first use.
    if name in _LAZY:
        from gateway.runtime import multiplex

        return getattr(multiplex, name)
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
