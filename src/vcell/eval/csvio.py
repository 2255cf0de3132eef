"""Tables in cell-eval's CSV format (polars' writer): ``results``, ``agg_results``, score and DE tables.

A null is an empty field and an empty text ``""``; floats are written with polars' notation
(shortest round-trip digits, positional down to 1e-5, exponents without padding); a NaN is
``NaN`` in the score tables and null in the DE tables (as pdex's tables reach polars). Kept apart
from the scoring so that readers and writers of these tables import nothing else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vcell.data.io import atomic_path
from vcell.errors import VcellError

__all__ = ["read_csv", "write_csv", "write_de_csv"]

#: The columns of a DE table (``real_de.csv``, ``pred_de.csv``), as pdex writes them.
COLUMNS_DE = (
    "target", "feature", "target_mean", "ref_mean", "target_membership", "ref_membership",
    "log2_fold_change", "percent_change", "p_value", "statistic", "fdr",
)

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
    if not text or any(ch in text for ch in ',"\n\r'):
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


def _arrow_float_text(values):
    """Floats as polars writes them in a CSV, through Arrow's formatting: whole values get a
    trailing ``.0`` (pyarrow writes ``735``, which polars and pandas read back as an integer
    column; polars then fails on the first ``735.5`` after its first 100 rows), and float64s
    where the two notations differ (1e-7 <= |x| < 1e-5 and 1e10 <= |x| < 1e16; float32s
    1e10 <= |x| < 1e13) are formatted here. NaN is null: an empty field."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = np.asarray(values)
    nan = np.isnan(values)
    text = pc.cast(pa.array(values, mask=nan if nan.any() else None), pa.string())
    size = np.abs(values)
    whole = (values == np.trunc(values)) & (size < 1e10)  # Arrow writes these as integers
    if whole.all():  # e.g. a tie-free prediction's Wilcoxon statistics
        text = pc.binary_join_element_wise(text, ".0", "")
    elif whole.any():
        text = pc.replace_with_mask(text, pa.array(whole), pc.binary_join_element_wise(pc.filter(text, pa.array(whole)), ".0", ""))
    if values.dtype == np.float64:
        odd = ((size >= 1e-7) & (size < 1e-5)) | ((size >= 1e10) & (size < 1e16))
        fmt = _format_float
    else:  # float32: from 1e10 every value is whole, and polars writes it in full below 1e13
        odd = (size >= 1e10) & (size < 1e13)
        fmt = lambda v: np.format_float_positional(v, unique=True, trim="0")  # noqa: E731
    if odd.any():
        text = pc.replace_with_mask(text, pa.array(odd), pa.array([fmt(v) for v in values[odd]], pa.string()))
    return text


def _label_text(labels):
    """Labels as Arrow text, quoted as polars quotes them (only where a comma, quote or line
    break needs it, and an empty text); ``None`` is null, an empty field."""
    import pyarrow as pa

    return pa.array([_format_cell(v if isinstance(v, str) or v is None else str(v)) for v in labels], pa.string())


def _int_text(values):
    """Integers or booleans (``true`` / ``false``) as Arrow text; a pandas nullable column's NA is null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(pa.array(values), pa.string())


def _de_columns(res, start: int, stop: int, targets, features) -> list:
    """Rows ``start:stop`` of ``res.to_frame()`` (a :class:`~vcell.eval.de.DEResult`) as Arrow
    text columns; ``targets`` / ``features``: :func:`_label_text` of its names."""
    import pyarrow.compute as pc

    n_f = res.p_value.shape[1]
    rows = np.arange(start, stop, dtype=np.int64)
    t_idx, f_idx = rows // n_f, rows % n_f
    flat = lambda a: a.reshape(-1)[start:stop]  # noqa: E731
    return [
        pc.take(targets, t_idx),
        pc.take(features, f_idx),
        _arrow_float_text(flat(res.target_mean)),
        _arrow_float_text(res.ref_mean[f_idx]),
        _int_text(np.asarray(res.target_membership, dtype=np.int64)[t_idx]),
        _int_text(np.full(stop - start, res.ref_membership, dtype=np.int64)),
        *(_arrow_float_text(flat(getattr(res, name))) for name in COLUMNS_DE[6:]),
    ]


def _frame_columns(frame: pd.DataFrame) -> list:
    """A DataFrame's rows as Arrow text columns: floats by :func:`_arrow_float_text`, integers
    as digits, booleans as ``true`` / ``false``, anything else as :func:`_label_text` labels."""
    import pyarrow.compute as pc

    columns = []
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_float_dtype(col):  # pandas' nullable Float64 too: NA is null, as NaN
            dtype = getattr(col.dtype, "numpy_dtype", col.dtype)
            columns.append(_arrow_float_text(col.to_numpy(dtype=dtype, na_value=np.nan)))
        elif pd.api.types.is_bool_dtype(col) or pd.api.types.is_integer_dtype(col):
            columns.append(_int_text(col))
        else:
            codes, uniques = pd.factorize(col, use_na_sentinel=False)
            columns.append(pc.take(_label_text([None if pd.isna(u) else u for u in uniques]), codes))
    return columns


def _rows_bytes(columns, names):
    """The CSV text of Arrow text columns (nulls empty), a line per row: pyarrow's writer
    unquoted, as every field is already quoted where it must be, unless a quoted field holds a
    comma (which that writer refuses unquoted): then the fields are joined here."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    try:
        sink = pa.BufferOutputStream()
        options = pacsv.WriteOptions(include_header=False, quoting_style="none")
        pacsv.write_csv(pa.RecordBatch.from_arrays(columns, names=names), sink, options)
        return sink.getvalue()
    except pa.ArrowInvalid:
        pass
    line = pc.binary_join_element_wise(*(pc.fill_null(c, "") for c in columns), ",")
    line = pc.binary_join_element_wise(line, "", "\n")  # each row followed by a line break
    offsets = np.frombuffer(line.buffers()[1], dtype=np.int32, count=len(line) + 1, offset=4 * line.offset)
    return line.buffers()[2][int(offsets[0]) : int(offsets[-1])]


def write_de_csv(table, path: str | os.PathLike, chunk_rows: int = 65536, threads: int = 1) -> None:
    """Write a DE table (a :class:`~vcell.eval.de.DEResult` or its ``to_frame()``) as cell-eval
    writes ``real_de.csv`` (polars): the same text, atomically.

    Formatted by Arrow's kernels (:func:`_arrow_float_text`), from the arrays, a chunk of rows at
    a time (little added to peak memory); with ``threads`` > 1 chunks are formatted in parallel
    (at most ``threads + 1`` held at once) and written in order.
    """
    if isinstance(table, pd.DataFrame):
        names, n_rows = [str(c) for c in table.columns], len(table)
        chunk = lambda start: _frame_columns(table.iloc[start : start + chunk_rows])  # noqa: E731
    else:  # a DEResult (not imported here: the DE engine imports this module)
        names, n_rows = COLUMNS_DE, table.p_value.size
        labels = (_label_text(table.targets), _label_text(table.features))
        chunk = lambda start: _de_columns(table, start, min(n_rows, start + chunk_rows), *labels)  # noqa: E731

    def text(start: int):
        return _rows_bytes(chunk(start), list(names))

    starts = range(0, n_rows, chunk_rows)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write((",".join(_format_cell(n) for n in names) + "\n").encode())
        if threads <= 1 or len(starts) <= 1:
            for start in starts:
                out.write(text(start))
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:  # Arrow formats without the GIL
            pending: deque = deque()
            for start in starts:
                pending.append(pool.submit(text, start))
                if len(pending) > threads:
                    out.write(pending.popleft().result())
            while pending:
                out.write(pending.popleft().result())
