"""`gateway actuals FILE.csv` can name each actual's multiplexed model id (a third column), so
actuals of a multiplexed application join their predictions, named by model id."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import PredictionRecordsConfig
from gateway.records.actuals import ActualsFileError, actual_records, read_actuals_csv
from gateway.records.decode import Plan


def test_third_column_names_the_model(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("prediction_id,actual,multiplexed_model_id\nr1:0,yes,tenant-b\nr2:0,no,\n")
    rows = read_actuals_csv(p)
    assert rows == [
        {"prediction_id": "r1:0", "actual_label": "yes", "multiplexed_model_id": "tenant-b"},
        {"prediction_id": "r2:0", "actual_label": "no"},
    ]
    plan = Plan("tenants", PredictionRecordsConfig(enabled=True), [])
    recs, _ = actual_records(plan, rows)
    assert [r.model_name for r in recs] == ["tenant-b", "tenants"]
    (tmp_path / "b.csv").write_text("r1:0,yes,x,extra\n")
    with pytest.raises(ActualsFileError, match="2 or 3 columns"):
        read_actuals_csv(tmp_path / "b.csv")
