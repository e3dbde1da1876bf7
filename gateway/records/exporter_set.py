"""The record exporters a pipeline sends to: built on first use from the config, one worker
(bounded queue, own thread) each, "default" resolved to Arize (keys set) or the JSONL file."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from exporters.records import registry
from exporters.records.base import ExporterContext, RecordExporter
from gateway.config import GatewayConfig
from gateway.records.decode import Plan
from gateway.records.workers import ExporterStats, ExporterWorker

log = logging.getLogger("gateway.records")


class ExporterSet:
    """Exporter workers by name; `targets(plan)` gives a plan's, each once."""

    def __init__(self, config: GatewayConfig, logs_dir: Path) -> None:
        self.config = config
        """Read when an exporter is built (the pipeline updates it on a deploy)."""
        self.logs_dir = logs_dir
        self.workers: dict[str, ExporterWorker] = {}
        self.stats: dict[str, ExporterStats] = {}
        """Per exporter name: exported, failed, retries, dropped by reason."""
        self._lock = threading.Lock()

    def _arize_settings(self) -> dict[str, Any]:
        a = self.config.records.arize
        return {
            "api_key": a.api_key.get_secret_value() if a.api_key else None,
            "space_id": a.space_id.get_secret_value() if a.space_id else None,
            "api_scheme": a.api_scheme, "api_host": a.api_host, "api_port": a.api_port,
            "timeout_s": a.timeout_s, "max_retries": a.max_retries,
            "backoff_initial_s": a.backoff_initial_s, "backoff_max_s": a.backoff_max_s,
            "max_workers": a.max_workers,
        }

    def _jsonl_settings(self) -> dict[str, Any]:
        path = self.config.records.jsonl_path
        return {"path": path or str(self.logs_dir / "records.jsonl")}

    @property
    def arize_keys_set(self) -> bool:
        a = self.config.records.arize
        return bool(a.api_key and a.api_key.get_secret_value()
                    and a.space_id and a.space_id.get_secret_value())

    def resolve_name(self, name: str) -> str:
        if name == "default":
            return "arize" if self.arize_keys_set else "jsonl"
        return name

    def _build(self, name: str) -> tuple[RecordExporter | None, int]:
        rc = self.config.records
        entry = next((e for e in rc.exporters if e.name == name), None)
        type_name = entry.type if entry is not None else name
        options = entry.options if entry is not None else {}
        queue_size = entry.queue_size if entry is not None else rc.queue_size
        settings: dict[str, Any] = {}
        if type_name == "arize":
            settings = self._arize_settings()
        elif type_name == "jsonl":
            settings = self._jsonl_settings()
        try:
            cls = registry.resolve(type_name)
            exporter = cls(options, ExporterContext(logs_dir=self.logs_dir, settings=settings))
        except Exception as e:
            log.error("record exporter %r (%s) is unavailable: %s: %s", name, type_name,
                      type(e).__name__, e)
            return None, queue_size
        return exporter, queue_size

    def worker(self, name: str) -> ExporterWorker:
        """The worker for exporter `name` ("default" resolved), built and started on first use
        (blocking: may import an exporter's SDK; never call it on the event loop)."""
        name = self.resolve_name(name)
        w = self.workers.get(name)
        if w is not None:
            return w
        with self._lock:
            w = self.workers.get(name)
            if w is not None:
                return w
            exporter, queue_size = self._build(name)
            if exporter is None and name == "arize" and "arize" not in {
                e.name for e in self.config.records.exporters
            } and self.arize_keys_set:
                log.warning("records go to the JSONL file instead")
                return self._jsonl_fallback()
            rc = self.config.records
            w = ExporterWorker(name, exporter, queue_size, rc.batch_size, rc.flush_interval_s)
            self.stats[name] = w.stats
            self.workers[name] = w
            w.start()
            if exporter is not None:
                where = getattr(exporter, "endpoint", None) or getattr(exporter, "path", "")
                log.info("prediction records: exporter %r ready%s", name,
                         f" ({where})" if where else "")
            return w

    def _jsonl_fallback(self) -> ExporterWorker:
        existing = self.workers.get("jsonl")
        if existing is not None:
            self.workers["arize"] = existing
            return existing
        exporter, queue_size = self._build("jsonl")
        rc = self.config.records
        w = ExporterWorker("jsonl", exporter, queue_size, rc.batch_size, rc.flush_interval_s)
        self.stats["jsonl"] = w.stats
        self.workers["arize"] = self.workers["jsonl"] = w
        w.start()
        return w

    def targets(self, plan: Plan) -> list[ExporterWorker]:
        """The plan's exporters, each once: two names may resolve to one exporter (`default`
        and `jsonl` without keys, or `arize` after its fallback to the JSONL file)."""
        out: list[ExporterWorker] = []
        for name in plan.exporters:
            w = self.worker(name)
            if all(w is not o for o in out):
                out.append(w)
        return out
