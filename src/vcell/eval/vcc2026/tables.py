"""cell-eval2's output tables: ``results.csv`` (long) and ``agg_results.csv`` (wide).

``results.csv`` has one row per (perturbation, metric) with columns ``perturbation``,
``metric``, ``value``; an undefined value is ``NaN``, except ``de_wilcoxon_lfc_nmae``, whose
omitted perturbations (gate below 10 genes) have no row. ``expr_mse_unbiased_capped_norm``, a
ratio of panel sums, has no per-perturbation row. ``agg_results.csv`` has a ``statistic``
column (:data:`AGG_STATISTICS`) and one column per metric, alphabetically: ``count`` counts the
rows, the other statistics skip NaN (``std`` with ddof 1); the ratio metric fills ``mean`` only.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vcell.eval.vcc2026.metrics import METRICS

#: Rows of ``agg_results.csv``, in order.
AGG_STATISTICS = ("count", "null_count", "mean", "std", "min", "max", "median")
#: The metric without per-perturbation values.
RATIO_METRIC = "expr_mse_unbiased_capped_norm"
#: Metrics whose undefined perturbations are left out of ``results.csv`` rather than written NaN.
OMITTED_WHEN_UNDEFINED = ("de_wilcoxon_lfc_nmae",)


def results_long(perturbations: list[str], values: dict[str, np.ndarray]) -> pd.DataFrame:
    """The long ``results`` table of per-perturbation ``values`` (metric -> array)."""
    rows_p, rows_m, rows_v = [], [], []
    for metric in sorted(values):
        v = np.asarray(values[metric], dtype=np.float64)
        for p, x in zip(perturbations, v, strict=True):
            if metric in OMITTED_WHEN_UNDEFINED and np.isnan(x):
                continue
            rows_p.append(p)
            rows_m.append(metric)
            rows_v.append(float(x))
    return pd.DataFrame({"perturbation": pd.Series(rows_p, dtype=object), "metric": pd.Series(rows_m, dtype=object),
                         "value": np.asarray(rows_v, dtype=np.float64)})


def _describe(v: np.ndarray) -> list[float]:
    finite = v[~np.isnan(v)]
    n = finite.size
    return [
        float(v.size),
        0.0,
        float(finite.mean()) if n else math.nan,
        float(finite.std(ddof=1)) if n > 1 else math.nan,
        float(finite.min()) if n else math.nan,
        float(finite.max()) if n else math.nan,
        float(np.median(finite)) if n else math.nan,
    ]


def agg_wide(results: pd.DataFrame, ratio: float | None = None, metrics=METRICS) -> pd.DataFrame:
    """The wide ``agg_results`` table of a long ``results`` table (plus the ratio metric's value).

    Every metric of ``metrics`` has a column, also one without rows (count 0, the rest NaN).
    """
    metrics = sorted(set(metrics) | set(results["metric"]) | ({RATIO_METRIC} if ratio is not None else set()))
    out = {"statistic": list(AGG_STATISTICS)}
    for m in metrics:
        if m == RATIO_METRIC:
            out[m] = [math.nan, math.nan, math.nan if ratio is None else float(ratio), math.nan, math.nan, math.nan, math.nan]
        else:
            out[m] = _describe(results.loc[results["metric"] == m, "value"].to_numpy(dtype=np.float64))
    return pd.DataFrame(out)


def agg_means(agg: pd.DataFrame) -> dict[str, float]:
    """metric -> its ``mean`` row of a wide ``agg_results`` table."""
    row = agg.loc[agg["statistic"].astype(str) == "mean"].iloc[0]
    return {c: float(row[c]) if row[c] is not None and row[c] is not pd.NA else math.nan for c in agg.columns if c != "statistic"}
