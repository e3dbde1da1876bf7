"""gRPC observability gateway for model serving."""

__version__ = "0.1.0"
