"""Prediction records: sampling, capture, decoding, exporter workers, actuals."""
