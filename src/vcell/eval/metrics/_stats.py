"""Small numerical helpers with cell-eval's (polars / scipy / sklearn) semantics."""

from __future__ import annotations

import math

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged; NaN ranks above every number and NaNs tie (polars)."""
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    order = np.lexsort((np.where(nan, 0.0, x), nan))
    xs = x[order]
    same = (xs[1:] == xs[:-1]) | (np.isnan(xs[1:]) & np.isnan(xs[:-1]))
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN for fewer than two values or a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()
    nx, ny = np.linalg.norm(xm), np.linalg.norm(ym)
    if nx == 0 or ny == 0 or not np.isfinite(nx * ny):
        return math.nan
    return float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation as polars computes it (average ranks, NaN ranked highest)."""
    if len(x) < 2:
        return math.nan
    return _pearson(_average_ranks(x), _average_ranks(y))


def _binary_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each distinct score threshold, highest score first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last]
    return tps, (last + 1) - tps


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    tps, fps = _binary_curve(labels, scores)
    precision = tps / (tps + fps)
    recall_step = np.diff(np.r_[0.0, tps]) / tps[-1]
    return float(np.sum(recall_step * precision))


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    tps, fps = _binary_curve(labels, scores)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _neg_log10_float32(q: np.ndarray) -> np.ndarray:
    """``-log10(q)`` of float32 values, evaluated in float32 as polars does
    (``ln(q) / ln(10)``, both rounded to float32)."""
    ln = np.log(q.astype(np.float64)).astype(np.float32)
    return -(ln / np.float32(math.log(10.0)))
