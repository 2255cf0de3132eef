"""Tables in cell-eval's CSV format (polars' writer): ``results``, ``agg_results`` and score tables.

A null is an empty field, a NaN is ``NaN``, floats are written with polars' notation (shortest
round-trip digits, positional down to 1e-5, exponents without padding). Kept apart from the
scoring so that readers and writers of these tables import nothing else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vcell.data.io import atomic_path
from vcell.errors import VcellError

__all__ = ["read_csv", "write_csv"]

#: Columns read as text by :func:`read_csv` (every other column is numeric).
TEXT_COLUMNS = ("perturbation", "statistic", "metric")


def _format_float(value: float) -> str:
    """A float as polars writes it: shortest round-trip digits, positional down to 1e-5,
    exponents without padding (``3e-7``, ``1e+16``)."""
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    exp = int(exponent)
    if exp == -5:
        return np.format_float_positional(value, unique=True, trim="-")
    return f"{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"


def _format_cell(value) -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float | np.floating):
        return _format_float(float(value))
    text = str(value)
    if any(ch in text for ch in ',"\n\r'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``results`` / ``agg_results`` / a score table as cell-eval does (null: empty field,
    NaN: ``NaN``, floats in polars' notation)."""
    lines = [",".join(_format_cell(c) for c in table.columns)]
    columns = [table[c].array for c in table.columns]
    for i in range(len(table)):
        lines.append(",".join(_format_cell(col[i]) for col in columns))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write("\n".join(lines) + "\n")


def read_csv(
    path: str | os.PathLike,
    text_columns: Sequence[str] = TEXT_COLUMNS,
) -> pd.DataFrame:
    """Read a table written by cell-eval (or :func:`write_csv`), keeping null (empty field)
    distinct from NaN; numeric columns become nullable ``Float64``."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VcellError(f"{path}: not a CSV table ({type(exc).__name__}: {detail})") from None
    out = pd.DataFrame(index=raw.index)
    for name in raw.columns:
        column = raw[name]
        if name in text_columns:
            out[name] = column.astype(object)
            continue
        mask = (column == "").to_numpy()
        try:
            data = np.array([0.0 if m else float(v) for v, m in zip(column, mask)], dtype=np.float64)
        except ValueError:
            bad = next(v for v, m in zip(column, mask) if not m and not _is_number(v))
            raise VcellError(f"{path}: column {name!r} holds {bad!r}, not a number") from None
        out[name] = pd.arrays.FloatingArray(data, mask)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
