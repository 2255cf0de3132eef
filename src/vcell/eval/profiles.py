"""Metric profiles (lists of metric names, as cell-eval 0.8.2 defines them) and the function that
computes one into cell-eval's ``results`` table.

``results`` has one row per perturbation and one column per metric: the first column is
``perturbation``; then the DE metrics, then the expression metrics, each group in profile order
(cell-eval computes all DE metrics first); a metric with several values per perturbation
(``de_nsig_counts``) gives one column per value (``de_nsig_counts_real``,
``de_nsig_counts_pred``); a metric with one value for all perturbations repeats it on every row.
Values are nullable floats (``Float64``): a perturbation a metric does not cover is null (e.g.
``de_direction_match`` without real significant genes), distinct from a computed NaN (e.g. a
Spearman correlation of constant values), because cell-eval's aggregation treats them
differently. A metric that covers no perturbation at all has no column (cell-eval's table is a
pivot of the values it has).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vcell.errors import VcellError, did_you_mean
from vcell.eval.metrics import DEData, ExpressionData, MetricUndefined, get_metric

logger = logging.getLogger(__name__)
_said: set[str] = set()  # why a metric was left out or has no column: said once per process (a bench scores many predictions)


def _say_once(level: int, note: str) -> None:
    """Log ``note`` at ``level`` the first time in this process, at DEBUG after."""
    logger.log(logging.DEBUG if note in _said else level, "%s", note)
    _said.add(note)


__all__ = ["PERTURBATION_COLUMN", "PROFILES", "compute_results", "profile_metrics"]

#: Name of the perturbation column of ``results`` (as cell-eval writes it).
PERTURBATION_COLUMN = "perturbation"

_DE_METRICS = [
    "overlap_at_N",
    "overlap_at_50",
    "overlap_at_100",
    "overlap_at_200",
    "overlap_at_500",
    "precision_at_N",
    "precision_at_50",
    "precision_at_100",
    "precision_at_200",
    "precision_at_500",
    "de_spearman_sig",
    "de_direction_match",
    "de_spearman_lfc_sig",
    "de_sig_genes_recall",
    "de_nsig_counts",
    "pr_auc",
    "roc_auc",
]

_EXPRESSION_METRICS = [
    "pearson_delta",
    "mse",
    "mae",
    "mse_delta",
    "mae_delta",
    "discrimination_score_l1",
    "discrimination_score_l2",
    "discrimination_score_cosine",
    "pearson_edistance",
    "clustering_agreement",
]

#: cell-eval 0.8.2's profiles. ``vcc`` is the Virtual Cell Challenge 2025 score's three metrics.
PROFILES: dict[str, list[str]] = {
    "full": _DE_METRICS + _EXPRESSION_METRICS,
    "de": list(_DE_METRICS),
    "anndata": list(_EXPRESSION_METRICS),
    "minimal": [
        "pearson_delta",
        "mse",
        "mae",
        "discrimination_score_l1",
        "overlap_at_N",
        "precision_at_N",
        "de_nsig_counts",
    ],
    "vcc": ["mae", "discrimination_score_l1", "overlap_at_N"],
    "pds": ["discrimination_score_l1"],
}


def profile_metrics(profile: str | Sequence[str]) -> list[str]:
    """The metric names of a profile (a profile name, or a list of metric names)."""
    if isinstance(profile, str):
        if profile == "vcc2026":
            raise VcellError("profile 'vcc2026' scores raw counts with cell-eval2's metrics: `vcell eval ... --profile vcc2026`, "
                             "or vcell.evaluate_2026 / scale_2026 / score_2026 in Python")
        if profile not in PROFILES:
            known = [*PROFILES, "vcc2026"]
            raise VcellError(f"unknown metric profile {profile!r}{did_you_mean(profile, known)}; known profiles: {', '.join(known)}")
        names = PROFILES[profile]
    else:
        names = list(profile)
    for name in names:
        get_metric(name)  # a one-line error for an unknown name
    return list(names)


def selected_metrics(profile: str | Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """The metrics of ``profile`` without those in ``skip``; a name in ``skip`` that the profile does
    not have is a one-line error (with a did-you-mean), not silently ignored."""
    names = profile_metrics(profile)
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise VcellError(f"--skip-metrics {unknown[0]!r}: not a metric of the {profile!r} profile"
                         f"{did_you_mean(unknown[0], names)} (its metrics: {', '.join(names)})")
    return [n for n in names if n not in set(skip)]


def compute_results(
    expression: ExpressionData | None = None,
    de: DEData | None = None,
    profile: str | Sequence[str] = "full",
    *,
    skip: Iterable[str] = (),
    metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Compute a profile's metrics into cell-eval's ``results`` table.

    Parameters
    ----------
    expression, de
        The inputs; the metrics of a kind whose input is ``None`` are left out (as cell-eval
        does without DE for the ``pds`` profile).
    profile
        A name of :data:`PROFILES` or a list of metric names.
    skip
        Metric names to leave out.
    metric_kwargs
        Per-metric keyword overrides, e.g. ``{"overlap_at_N": {"fdr_threshold": 0.01}}``.

    Returns
    -------
    The ``results`` table (see the module docstring). ``results.attrs["skipped"]`` maps each
    metric that is undefined for these inputs (and therefore absent, as in cell-eval) to the
    reason.
    """
    skip = set(skip)
    names = [n for n in profile_metrics(profile) if n not in skip]
    metric_kwargs = metric_kwargs or {}
    inputs = {"de": de, "expression": expression}
    ordered = [n for n in names if get_metric(n).kind == "de"] + [n for n in names if get_metric(n).kind == "expression"]

    columns: dict[str, dict[str, float]] = {}
    rows: dict[str, None] = {}  # perturbations in order of first appearance
    skipped: dict[str, str] = {}
    for name in ordered:
        metric = get_metric(name)
        data = inputs[metric.kind]
        if data is None:
            logger.info("metric %s skipped: no %s input", name, metric.kind)
            continue
        try:
            value = metric(data, **metric_kwargs.get(name, {}))
        except MetricUndefined as err:
            _say_once(logging.WARNING, f"metric {name} left out: {err}")
            skipped[name] = str(err)
            continue
        for column, per_pert in _columns(name, value, data.perturbations):
            if not per_pert:
                # No perturbation has a value (e.g. no real significant gene anywhere): cell-eval
                # has no row for the metric, so its pivoted table has no column either.
                _say_once(logging.INFO, f"metric {column} has no value for any perturbation; no column")
                continue
            columns[column] = per_pert
            rows.update(dict.fromkeys(per_pert))

    if not columns:
        table = pd.DataFrame()
    else:
        perts = list(rows)
        table = pd.DataFrame({PERTURBATION_COLUMN: pd.Series(perts, dtype=object)})
        for column, per_pert in columns.items():
            table[column] = _nullable([per_pert.get(p) for p in perts])
    table.attrs["skipped"] = skipped
    return table


def _columns(name: str, value, perturbations: np.ndarray) -> list[tuple[str, dict[str, float]]]:
    """The result columns of one metric value, each as {perturbation: value}."""
    if isinstance(value, pd.DataFrame):
        return [(f"{name}_{sub}", {str(p): float(v) for p, v in value[sub].items()}) for sub in value.columns]
    if isinstance(value, pd.Series):
        return [(name, {str(p): float(v) for p, v in value.items()})]
    return [(name, {str(p): float(value) for p in perturbations})]


def _nullable(values: list[float | None]) -> pd.arrays.FloatingArray:
    """A ``Float64`` array where ``None`` is null and NaN stays NaN."""
    mask = np.array([v is None for v in values], dtype=bool)
    data = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
    return pd.arrays.FloatingArray(data, mask)
