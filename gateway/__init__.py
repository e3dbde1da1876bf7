"""gRPC observability gateway for model serving."""

__version__ = "0.1.0"

# `gateway.status(address)` returns what `gateway status` prints, as dataclasses. Imported
# eagerly so `import gateway` is enough.
from gateway.admin.client import status
from gateway.admin.status import GatewayStatus

__all__ = ["GatewayStatus", "__version__", "status"]
