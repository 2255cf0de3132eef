"""Aggregation of ``results`` and the Virtual Cell Challenge 2025 baseline-scaled score.

* :func:`agg_results` summarises each metric over perturbations exactly as cell-eval's
  ``agg_results.csv`` (polars ``DataFrame.describe()``): a ``statistic`` column with rows
  ``count``, ``null_count``, ``mean``, ``std``, ``min``, ``25%``, ``50%``, ``75%``, ``max``.
* :func:`score` compares a model's aggregate with a baseline's, as ``cell-eval score`` does, and
  adds the unclipped value beside each clipped one.
* :func:`write_csv` / :func:`read_csv` write and read these tables the way cell-eval (polars)
  writes them: a null is an empty field, a NaN is ``NaN``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vcell.errors import VcellError, preview
from vcell.eval.csvio import read_csv, write_csv
from vcell.eval.metrics import REGISTRY
from vcell.eval.profiles import PERTURBATION_COLUMN, profile_metrics

logger = logging.getLogger(__name__)

__all__ = ["STATISTICS", "STATISTIC_COLUMN", "agg_results", "read_csv", "score", "write_csv"]

STATISTIC_COLUMN = "statistic"
_QUANTILES = {"25%": 0.25, "50%": 0.5, "75%": 0.75}
#: Rows of ``agg_results``, in order.
STATISTICS = ("count", "null_count", "mean", "std", "min", *_QUANTILES, "max")


def _column_values(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, null mask) of a column; a nullable column keeps NaN distinct from null."""
    if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
        raise VcellError(f"results column {column.name!r} is not numeric (dtype {column.dtype})")
    array = column.array
    if isinstance(array, pd.arrays.FloatingArray | pd.arrays.IntegerArray | pd.arrays.BooleanArray):
        return np.asarray(array._data, dtype=np.float64), np.asarray(array._mask, dtype=bool)
    values = column.to_numpy(dtype=np.float64)
    return values, np.zeros(values.size, dtype=bool)


def _describe(values: np.ndarray, null: np.ndarray) -> list[float | None]:
    """polars ``describe`` of one float column: nulls are skipped, NaN propagates into mean and
    std, is ignored by min and max, and sorts above every number for the percentiles, which take
    the nearest rank ``round_half_up((n - 1) * q)``."""
    v = values[~null]
    n = v.size
    if n == 0:
        return [0.0, float(null.size)] + [None] * (len(STATISTICS) - 2)
    finite_or_inf = v[~np.isnan(v)]
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(np.mean(v))
        std = float(np.std(v, ddof=1)) if n > 1 else None
    lo = float(finite_or_inf.min()) if finite_or_inf.size else math.nan
    hi = float(finite_or_inf.max()) if finite_or_inf.size else math.nan
    ordered = np.sort(v)  # NaN last
    quantiles = [float(ordered[int(math.floor((n - 1) * q + 0.5))]) for q in _QUANTILES.values()]
    return [float(n), float(null.size - n), mean, std, lo, *quantiles, hi]


def agg_results(results: pd.DataFrame) -> pd.DataFrame:
    """cell-eval's ``agg_results`` of a ``results`` table (one row per perturbation).

    Every column except ``perturbation`` is described; the output has a ``statistic`` column
    (:data:`STATISTICS`) followed by one nullable-float column per metric.
    """
    metrics = [c for c in results.columns if c != PERTURBATION_COLUMN]
    out = pd.DataFrame({STATISTIC_COLUMN: pd.Series(STATISTICS, dtype=object)})
    for name in metrics:
        described = _describe(*_column_values(results[name]))
        mask = np.array([v is None for v in described])
        data = np.array([0.0 if v is None else v for v in described], dtype=np.float64)
        out[name] = pd.arrays.FloatingArray(data, mask)
    return out


def score(
    user: pd.DataFrame, baseline: pd.DataFrame, statistic: str = "mean", names: tuple[str, str] = ("the user table", "the baseline table"),
    profile: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Baseline-scaled score of a model's ``agg_results`` against a baseline's (VCC 2025).

    For each metric registered with a best value (columns such as ``de_nsig_counts_real`` are
    skipped), with ``u`` and ``b`` the ``statistic`` row of the user and baseline tables:
    ``1 - u / b`` for metrics whose best is 0, ``(u - b) / (1 - b)`` for those whose best is 1.
    ``from_baseline`` is cell-eval's value: NaN replaced by 0, then clipped below at 0;
    ``unclipped`` is the same with NaN replaced by 0 but without the clip. The last row,
    ``avg_score``, is the mean over metrics of each column.

    Rows: the best-0 metrics, then the best-1 metrics, each in column order, then ``avg_score``.
    ``names`` name the two tables in messages (their files, from the command line). ``profile``
    (a profile name such as ``"vcc"``, or metric names) scores only its metrics, those the tables
    have (the VCC 2025 score: ``"vcc"``); ``None`` scores every metric of the tables, as cell-eval.
    """
    for name, table in zip(names, (user, baseline)):
        if not isinstance(table, pd.DataFrame):
            hint = " (pass result.agg)" if isinstance(getattr(table, "agg", None), pd.DataFrame) else ""
            raise VcellError(f"{name}: an agg_results table (a DataFrame){hint}, got {type(table).__name__}")
        if STATISTIC_COLUMN not in table.columns:
            raise VcellError(f"{name}: no {STATISTIC_COLUMN!r} column (columns: {preview(table.columns, 8)}); "
                             "pass agg_results.csv tables, not results.csv")
    if profile is not None:  # each table's columns of the profile; the two must then agree
        user, baseline = (table[[STATISTIC_COLUMN, *_profile_columns(table, profile, name, warn=i == 0)]]
                          for i, (name, table) in enumerate(zip(names, (user, baseline))))
    if list(user.columns) != list(baseline.columns):
        differ = sorted(set(user.columns) ^ set(baseline.columns))
        raise VcellError(
            f"{names[0]} and {names[1]} have different columns ({preview(differ, 6) if differ else 'same names, another order'}); "
            "score two agg_results.csv of the same profile"
        )
    stats = user[STATISTIC_COLUMN].astype(str).tolist()
    if statistic not in stats or statistic not in baseline[STATISTIC_COLUMN].astype(str).tolist():
        raise VcellError(f"statistic {statistic!r} not found in the agg_results tables (found: {', '.join(stats)})")

    metrics = [c for c in user.columns if c != STATISTIC_COLUMN]
    unscored = tuple(f"{name}_" for name, metric in REGISTRY.items() if metric.best is None)  # e.g. de_nsig_counts_real
    for m in metrics:
        if m not in REGISTRY and not m.startswith(unscored):
            logger.warning("score: %s is not a registered metric; left out", m)
    by_best = {
        best: [m for m in metrics if m in REGISTRY and REGISTRY[m].best == best] for best in (0.0, 1.0)
    }
    u = _statistic_row(user, statistic)
    b = _statistic_row(baseline, statistic)
    u0, b0 = (np.array([row[m] for m in by_best[0.0]], dtype=np.float64) for row in (u, b))
    u1, b1 = (np.array([row[m] for m in by_best[1.0]], dtype=np.float64) for row in (u, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.concatenate([1.0 - u0 / b0, (u1 - b1) / (1.0 - b1)])
    unclipped = np.where(np.isnan(raw), 0.0, raw)
    clipped = np.clip(unclipped, 0.0, None)
    names = by_best[0.0] + by_best[1.0]
    with np.errstate(invalid="ignore"):
        avg = (float(clipped.mean()), float(unclipped.mean())) if names else (math.nan, math.nan)
    return pd.DataFrame(
        {
            "metric": pd.Series([*names, "avg_score"], dtype=object),
            "from_baseline": np.append(clipped, avg[0]),
            "unclipped": np.append(unclipped, avg[1]),
        }
    )


def _profile_columns(table: pd.DataFrame, profile: str | Sequence[str], name: str, warn: bool) -> list[str]:
    """The columns of ``profile``'s metrics (one metric may give several: ``de_nsig_counts_real``), in table order."""
    columns = [c for c in table.columns if c != STATISTIC_COLUMN]
    wanted = profile_metrics(profile)
    keep = [c for c in columns if any(c == m or c.startswith(f"{m}_") and c not in REGISTRY for m in wanted)]
    what = f"profile {profile!r}" if isinstance(profile, str) else "the metrics asked for"
    absent = [m for m in wanted if not any(c == m or c.startswith(f"{m}_") for c in keep)]
    if len(absent) == len(wanted):
        raise VcellError(f"{name}: none of the metrics of {what} ({preview(wanted, 6)}) is in the table "
                         f"(it holds {preview(columns, 6)}); score it with the profile it was evaluated with")
    if absent and warn:
        logger.warning("score: %s has no column for %s of %s (a metric that covers no perturbation has none); scored without",
                       name, preview(absent, 6), what)
    return keep


def _statistic_row(table: pd.DataFrame, statistic: str) -> dict[str, float]:
    row = table.loc[table[STATISTIC_COLUMN].astype(str) == statistic].iloc[0]
    return {c: _as_float(row[c]) for c in table.columns if c != STATISTIC_COLUMN}


def _as_float(value) -> float:
    return math.nan if value is None or value is pd.NA else float(value)
