"""Client-facing doors other than the gRPC listener (which is gateway/dataplane/proxy.py)."""
