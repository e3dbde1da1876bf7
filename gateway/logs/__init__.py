"""Structured logs: format, access log, replica logging, rotation."""
