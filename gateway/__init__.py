"""gRPC observability gateway for model serving."""

__version__ = "0.1.0"

# `gateway.status(address)` returns what `gateway status` prints, as dataclasses. Imported
# eagerly: binding the function after the submodule loads keeps `gateway.status` the function.
from gateway.status import GatewayStatus, status

__all__ = ["GatewayStatus", "__version__", "status"]
