"""Exporters: metric readers and prediction-record exporters, found through entry points."""
