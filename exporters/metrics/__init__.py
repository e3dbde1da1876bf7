"""Metric exporters (entry-point group `grpc_gateway.metric_exporters`)."""
