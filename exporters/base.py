"""Kept for third-party record exporters: `exporters.base.RecordExporter` (see README)."""

from exporters.records.base import (
    ActualRecord,
    ExporterContext,
    ExportResult,
    PredictionRecord,
    RecordExporter,
)

__all__ = ["ActualRecord", "ExportResult", "ExporterContext", "PredictionRecord", "RecordExporter"]
