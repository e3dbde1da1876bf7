"""Finding record exporters: entry points of `grpc_gateway.record_exporters`, or `module:Class`."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from exporters.records.base import RecordExporter

ENTRY_POINT_GROUP = "grpc_gateway.record_exporters"


class ExporterNotFound(LookupError):
    """No exporter of that name or import path; the message says what exists."""


def available() -> list[str]:
    """Names registered in the entry-point group."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _check(cls: object, where: str) -> type[RecordExporter]:
    if not (isinstance(cls, type) and issubclass(cls, RecordExporter)):
        raise TypeError(f"record exporter {where} is not a subclass of RecordExporter")
    return cls


def resolve(type_name: str) -> type[RecordExporter]:
    """The exporter class for `type_name`: an entry-point name, or `module:Class`."""
    if ":" in type_name:
        module, _, attr = type_name.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ExporterNotFound(f"record exporter {type_name!r}: cannot import {module!r}: "
                                   f"{e}") from None
        cls = getattr(mod, attr, None)
        if cls is None:
            raise ExporterNotFound(f"record exporter {type_name!r}: {module!r} has no {attr!r}")
        return _check(cls, repr(type_name))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == type_name:
            return _check(ep.load(), f"{type_name!r} ({ep.value})")
    raise ExporterNotFound(
        f"no record exporter named {type_name!r}; registered: {', '.join(available()) or 'none'}"
        " (or give 'module:Class')"
    )
