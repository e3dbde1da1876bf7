"""Open Inference Protocol tensors as Python values, for prediction records.

Every datatype of the protocol (BF16 too) from typed or raw contents; FP32, FP16 and BF16 values
as the shortest decimal that reads back as the same narrow float (exact, and 5.1 not
5.0999999), FP64 values whole.
"""

from __future__ import annotations

import collections
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import FieldMapping
from gateway.oip import RAW_FORMAT, TYPED_FIELD


class DecodeProblem(ValueError):
    """A payload that could not be turned into records; the message says why."""


# -- floats ------------------------------------------------------------------------------------

_F32 = struct.Struct("<f")
_F16 = struct.Struct("<e")


def _shortest(x: float, pack: struct.Struct, digits: Iterable[int]) -> float:
    """The shortest decimal that reads back as the same narrow float (5.1, not 5.0999...)."""
    if not math.isfinite(x):
        return x
    for p in digits:
        y = float(f"{x:.{p}g}")
        try:
            if pack.unpack(pack.pack(y))[0] == x:
                return y
        except OverflowError:
            break
    return x


def f32(x: float) -> float:
    """An FP32 value, exact: the shortest of 6-9 significant digits that reads back the same."""
    return _shortest(x, _F32, (6, 7, 8, 9))


def f16(x: float) -> float:
    return _shortest(x, _F16, (3, 4, 5))


def _bf16(raw: bytes) -> list[float]:
    n = len(raw) // 2
    out = []
    for (h,) in struct.iter_unpack("<H", raw[: 2 * n]):
        (v,) = _F32.unpack(struct.pack("<I", h << 16))
        out.append(_shortest(v, _F32, (3, 4, 5, 6, 7, 8, 9)))
    return out


# -- Open Inference tensors ----------------------------------------------------------------------

_TYPED = TYPED_FIELD  # one table for the protocol (gateway/oip.py)
_RAW = RAW_FORMAT


def tensor_values(name: str, datatype: str, shape: Sequence[int], contents: Any,
                  raw: bytes | None) -> list[Any]:
    """The flat values of an Open Inference tensor, from raw or typed contents."""
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    values: list[Any]
    if raw is not None:
        if datatype == "BYTES":
            values, pos = [], 0
            while pos + 4 <= len(raw):
                (size,) = struct.unpack_from("<I", raw, pos)
                values.append(raw[pos + 4 : pos + 4 + size])
                pos += 4 + size
            if pos != len(raw):
                raise DecodeProblem(f"tensor {name!r}: raw BYTES contents are malformed")
        else:
            fmt = _RAW.get(datatype)
            if fmt is None:
                raise DecodeProblem(f"tensor {name!r}: unknown datatype {datatype!r}")
            size = struct.calcsize(fmt)
            if len(raw) != n * size:
                raise DecodeProblem(f"tensor {name!r}: {len(raw)} raw bytes for shape "
                                    f"{list(shape)} of {datatype}")
            if datatype == "BF16":
                return _bf16(raw)
            values = list(struct.unpack(f"<{n}{fmt}", raw))
    else:
        attr = _TYPED.get(datatype)
        if attr is None:
            raise DecodeProblem(f"tensor {name!r}: datatype {datatype!r} needs raw contents")
        values = list(getattr(contents, attr))
    if len(values) != n:
        raise DecodeProblem(f"tensor {name!r}: {len(values)} values for shape {list(shape)}")
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in values]
    if datatype == "FP32":
        return [f32(v) for v in values]
    if datatype == "FP16":
        return [f16(v) for v in values]
    return values


@dataclass
class _Tensor:
    name: str
    rows: int
    per_row: int
    values: list[Any]

    def row(self, i: int) -> list[Any]:
        if self.rows == 1:
            return self.values[: self.per_row]  # shared by every row
        return self.values[i * self.per_row : (i + 1) * self.per_row]


def decode_tensors(items: Sequence[Any], raw: Sequence[bytes], wanted: Callable[[str], bool],
             skipped: list[str]) -> list[_Tensor]:
    """The wanted tensors; one that cannot be decoded is named in `skipped`, not raised."""
    out = []
    for i, t in enumerate(items):
        if not wanted(t.name):
            continue
        shape = list(t.shape)
        try:
            values = tensor_values(t.name, t.datatype, shape, t.contents,
                                   raw[i] if i < len(raw) else None)
        except DecodeProblem as e:
            skipped.append(str(e))
            continue
        rows = max(int(shape[0]), 0) if shape else 1
        per_row = len(values) // rows if rows else 0
        out.append(_Tensor(t.name, rows, per_row, values))
    return out


def batch_rows(inputs: list[_Tensor], outputs: list[_Tensor]) -> int:
    """The call's row count (its batch dimension).

    Inputs vote with their first dimension, except `[1]`-shaped (or scalar) ones: those are
    parameters shared by every row. When the model answered, the first dimension most of its
    outputs share wins if an input agrees (or no input voted): the answer is per row. Otherwise
    the first dimension most inputs share wins, the smaller on a tie, so one odd input (an
    extra `[2]` beside `[1, 4]` features) never multiplies the rows.
    """
    votes = collections.Counter(t.rows for t in inputs if not (t.rows == 1 and t.per_row == 1))
    if outputs:
        answered = collections.Counter(t.rows for t in outputs).most_common()
        best = min(answered, key=lambda kv: (-kv[1], kv[0]))[0]
        if not votes or best in votes:
            return best
    if not votes:
        return 1
    return min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def oip_outputs(outputs: list[_Tensor], mapping: FieldMapping | None,
                 rows: int) -> tuple[_Tensor | None, _Tensor | None]:
    by_name = {t.name: t for t in outputs if t.rows == rows and t.per_row >= 1}
    label = score = None
    if mapping is not None and mapping.prediction_label:
        label = by_name.get(mapping.prediction_label)
    if mapping is not None and mapping.prediction_score:
        score = by_name.get(mapping.prediction_score)
    if label is None and (mapping is None or not mapping.prediction_label):
        label = next((by_name[n] for n in ("label", "labels", "class", "prediction",
                                           "predictions") if n in by_name), None)
        if label is None:
            label = next((t for t in by_name.values()
                          if t.values and isinstance(t.values[0], str)), None)
    if score is None and (mapping is None or not mapping.prediction_score):
        score = next((by_name[n] for n in ("score", "scores", "probability",
                                           "probabilities", "confidence") if n in by_name),
                     None)
        if score is None:
            score = next((t for t in by_name.values() if t is not label and t.values
                          and isinstance(t.values[0], float)), None)
    if label is not None and label.per_row != 1:
        label = None
    return label, score
