"""The HTTP ingress: Open Inference Protocol REST and JSON transcoding, on aiohttp."""

from gateway.ingress.http.server import HttpIngress

__all__ = ["HttpIngress"]
