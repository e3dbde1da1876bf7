"""Prediction-record exporters (entry-point group `grpc_gateway.record_exporters`)."""
