"""PredictionRecord.to_dict is written by hand (for speed): it must stay what asdict gives."""

from __future__ import annotations

from dataclasses import asdict, fields

from exporters.records.base import PredictionRecord


def test_to_dict_is_asdict_with_kind_and_copies() -> None:
    r = PredictionRecord("id", "m", 1, model_version="v1", prediction_label="p",
                         prediction_score=0.5, features={"a": 1.0, "b": ["x", "y"], "c": "s"},
                         tags={"t": "v", "u": 2}, application="app")
    d = r.to_dict()
    assert d == {"kind": "prediction", **asdict(r)}
    assert list(d) == ["kind", *(f.name for f in fields(r))]  # every field, in order
    d["features"]["b"].append("z")
    d["tags"]["t"] = "changed"
    assert r.features["b"] == ["x", "y"] and r.tags["t"] == "v"  # a copy, as asdict gives
