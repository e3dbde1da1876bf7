"""Delayed actuals (ground truth) as records: from the admin RPC's `Actual`s, or a CSV file
(`gateway actuals`)."""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exporters.records.base import MAX_PREDICTION_ID, ActualRecord, Record
from gateway.records.decode import Plan


def actual_records(plan: Plan, actuals: Sequence[Any]) -> tuple[list[Record],
                                                                collections.Counter[str]]:
    """The actuals of `plan`'s application that can join a prediction (model name from the
    config, as its predictions), and why the others cannot."""
    application = plan.app
    model_type = plan.cfg.model_type
    numeric = model_type in ("NUMERIC", "REGRESSION")
    records: list[Record] = []
    why: collections.Counter[str] = collections.Counter()
    for a in actuals:
        get = a.get if isinstance(a, Mapping) else (lambda k, _a=a: getattr(_a, k, None))
        pid = str(get("prediction_id") or "").strip()
        label = get("actual_label")
        label = None if label is None or label == "" else str(label)
        score = get("actual_score")
        if hasattr(a, "HasField") and not a.HasField("actual_score"):
            score = None
        if not pid or len(pid) > MAX_PREDICTION_ID:
            why["prediction id empty or longer than 512"] += 1
            continue
        if label is None and score is None:
            why["no actual label or score"] += 1
            continue
        if numeric and score is None:
            try:
                score = float(label)  # type: ignore[arg-type]
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                why[f"{model_type} model needs a numeric actual"] += 1
                continue
        # A multiplexed call's prediction went under its model id (Plan.model_of).
        model = plan.model_of(str(get("multiplexed_model_id") or "") or None)
        records.append(ActualRecord(
            prediction_id=pid, model_name=model, model_type=model_type,
            environment=plan.cfg.environment, actual_label=label,
            actual_score=None if score is None else float(score), application=application,
        ))
    return records, why


class ActualsFileError(ValueError):
    """A CSV of actuals that cannot be used; the message names the file and line."""


def read_actuals_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of `prediction_id,actual[,multiplexed_model_id]` (a header line is optional) as
    `Actual` fields: the text is the actual label, and also the actual score when it is a
    number; the optional third column names the model of a multiplexed application."""
    import csv

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ActualsFileError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ActualsFileError(f"{p}: not a UTF-8 text file") from None
    out: list[dict[str, Any]] = []
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if n == 1 and row[0].strip().lower() == "prediction_id":
            continue
        if len(row) not in (2, 3):
            raise ActualsFileError(f"{p}: line {n}: want 2 or 3 columns (prediction_id,actual"
                                   f"[,multiplexed_model_id]), got {len(row)}")
        pid, actual = row[0].strip(), row[1].strip()
        if not pid:
            raise ActualsFileError(f"{p}: line {n}: empty prediction_id")
        if not actual:
            raise ActualsFileError(f"{p}: line {n}: empty actual")
        item: dict[str, Any] = {"prediction_id": pid, "actual_label": actual}
        if len(row) == 3 and row[2].strip():
            # A multiplexed application's records are named by model id: this joins them.
            item["multiplexed_model_id"] = row[2].strip()
        try:
            score = float(actual)
        except ValueError:
            pass
        else:
            if math.isfinite(score):
                item["actual_score"] = score
        out.append(item)
    return out
