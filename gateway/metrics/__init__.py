"""Metrics of every call and of the control plane (OpenTelemetry, Ray's names)."""
