"""gRPC observability gateway for model serving."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# `gateway.status(address)` returns what `gateway status` prints, as dataclasses. Imported on
# first use (`import gateway` is enough): importing grpc here would come before the `gateway`
# command could set grpc's log verbosity (gateway/cli.py).
if TYPE_CHECKING:  # for type checkers; at run time `__getattr__` imports them on first use
    from gateway.admin.client import status
    from gateway.admin.status import GatewayStatus
    from gateway.runtime.multiplex import get_multiplexed_model_id, multiplexed

__all__ = [
    "GatewayStatus", "__version__", "get_multiplexed_model_id", "multiplexed", "status",
]

_LAZY = {"multiplexed", "get_multiplexed_model_id"}


def __getattr__(name: str) -> Any:
    # Model multiplexing for model code (gateway/runtime/multiplex.py): imported on first use,
    # so `import gateway` stays cheap for everyone else.
    if name in _LAZY:
        from gateway.runtime import multiplex

        return getattr(multiplex, name)
    if name == "status":
        from gateway.admin.client import status

        return status
    if name == "GatewayStatus":
        from gateway.admin.status import GatewayStatus

        return GatewayStatus
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
