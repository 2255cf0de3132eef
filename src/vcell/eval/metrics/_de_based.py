"""Metrics computed from the real and predicted differential-expression tables (kind ``"de"``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
import pandas as pd

from vcell.eval.metrics._inputs import DEData
from vcell.eval.metrics._registry import register
from vcell.eval.metrics._stats import _average_precision, _neg_log10_float32, _roc_auc, _spearman

__all__ = [
    "FDR_THRESHOLD",
    "de_auc",
    "de_direction_match",
    "de_nsig_counts",
    "de_overlap",
    "de_sig_genes_recall",
    "de_spearman_lfc_sig",
    "de_spearman_sig",
]

#: A gene is significant when its (float32) FDR is strictly below this, with no fold-change cut.
FDR_THRESHOLD = 0.05

#: Lower clip of the predicted FDR before ``-log10`` in ``pr_auc`` / ``roc_auc``.
_AUC_FDR_FLOOR = np.float32(1e-10)


def _per_pert(de: DEData, values: Iterable[float]) -> pd.Series:
    return pd.Series(list(values), index=pd.Index(de.perturbations, name="perturbation"), dtype=np.float64)


def de_overlap(
    de: DEData,
    k: int | None,
    metric: Literal["overlap", "precision"] = "overlap",
    fdr_threshold: float = FDR_THRESHOLD,
) -> pd.Series:
    """Overlap of the top significant genes (by |log2FC|) of the real and predicted DE.

    ``overlap``: ``k_eff = min(k or n_real, n_real)``; ``precision``:
    ``k_eff = min(k or n_pred, n_pred)``; score = |top-k_eff(real) & top-k_eff(pred)| / k_eff,
    0 when ``k_eff`` is 0. So ``overlap_at_N`` compares all real significant genes with the top
    ``n_real`` predicted ones, and ``precision_at_N`` all predicted significant genes with the
    top ``n_pred`` real ones. When either table has no significant gene at all, every
    perturbation scores 0. Genes with equal |log2FC| (often +-inf) keep table order at the cut;
    cell-eval's order there is arbitrary (see :meth:`_DESide.ranked_significant`).
    """
    real = de.real_side.ranked_significant(fdr_threshold)
    pred = de.pred_side.ranked_significant(fdr_threshold)
    if sum(r.size for r in real) == 0 or sum(p.size for p in pred) == 0:
        return _per_pert(de, [0.0] * de.perturbations.size)
    scores = []
    for r, p in zip(real, pred):
        size = r.size if metric == "overlap" else p.size
        k_eff = min(k or size, size)
        scores.append(0.0 if k_eff == 0 else np.intersect1d(r[:k_eff], p[:k_eff]).size / k_eff)
    return _per_pert(de, scores)


for _metric in ("overlap", "precision"):
    for _k in (None, 50, 100, 200, 500):
        register(
            f"{_metric}_at_{_k or 'N'}",
            kind="de",
            best=1.0,
            description=f"{_metric.capitalize()} of the top {_k or 'N'} significant DE genes",
            k=_k,
            metric=_metric,
        )(de_overlap)


@register("de_spearman_sig", kind="de", best=1.0)
def de_spearman_sig(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> float:
    """Spearman correlation, across perturbations, of the number of significant genes.

    Only perturbations with at least one real significant gene take part; 1.0 when there is
    none; one value for every perturbation.
    """
    n_real = de.real_side.significant(fdr_threshold).sum(axis=1)
    n_pred = de.pred_side.significant(fdr_threshold).sum(axis=1)
    keep = n_real > 0
    if not keep.any():
        return 1.0
    return _spearman(n_real[keep].astype(np.float64), n_pred[keep].astype(np.float64))


@register("de_direction_match", kind="de", best=1.0)
def de_direction_match(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.Series:
    """Share of the real significant genes whose predicted log2FC has the same sign.

    Over real significant genes present in the predicted table; ``sign(0) = 0``; NaN matches
    NaN. Null for perturbations without real significant genes.
    """
    real, pred = de.real_side, de.pred_side
    pairs = real.significant(fdr_threshold) & pred.present
    sr, sp = np.sign(real.lfc), np.sign(pred.lfc)
    match = (sr == sp) | (np.isnan(sr) & np.isnan(sp))
    out = {}
    for i, p in enumerate(de.perturbations):
        if pairs[i].any():
            out[p] = float(match[i, pairs[i]].mean())
    return pd.Series(out, dtype=np.float64)


@register("de_spearman_lfc_sig", kind="de", best=1.0)
def de_spearman_lfc_sig(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.Series:
    """Spearman correlation of real vs predicted log2FC over the real significant genes.

    A gene missing from the predicted table counts as log2FC 0. NaN for a single gene or a
    constant side; null for perturbations without real significant genes.
    """
    real, pred = de.real_side, de.pred_side
    sig = real.significant(fdr_threshold)
    pred_lfc = np.where(pred.present, pred.lfc, np.float32(0.0))
    out = {}
    for i, p in enumerate(de.perturbations):
        if sig[i].any():
            out[p] = _spearman(real.lfc[i, sig[i]], pred_lfc[i, sig[i]])
    return pd.Series(out, dtype=np.float64)


@register("de_sig_genes_recall", kind="de", best=1.0)
def de_sig_genes_recall(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.Series:
    """|real significant & predicted significant| / |real significant|; null without real ones."""
    real = de.real_side.significant(fdr_threshold)
    both = real & de.pred_side.significant(fdr_threshold)
    n_real, n_both = real.sum(axis=1), both.sum(axis=1)
    keep = n_real > 0
    return pd.Series(n_both[keep] / n_real[keep], index=de.perturbations[keep], dtype=np.float64)


@register("de_nsig_counts", kind="de", best=None)
def de_nsig_counts(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.DataFrame:
    """Number of significant genes per perturbation: columns ``real`` and ``pred``."""
    return pd.DataFrame(
        {
            "real": de.real_side.significant(fdr_threshold).sum(axis=1).astype(np.float64),
            "pred": de.pred_side.significant(fdr_threshold).sum(axis=1).astype(np.float64),
        },
        index=pd.Index(de.perturbations, name="perturbation"),
    )


def de_auc(de: DEData, method: Literal["pr", "roc"]) -> pd.Series:
    """Recovery of the real significant genes (label: real FDR < 0.05) from the predicted FDR.

    Score of a gene: ``-log10(clip(pred FDR, 1e-10, 1))`` in float32, a gene missing from the
    predicted table scoring as FDR 1. Per perturbation over the genes of its real table;
    ``pr``: average precision, ``roc``: area under the ROC curve; NaN when all labels agree.
    """
    real, pred = de.real_side, de.pred_side
    with np.errstate(invalid="ignore"):
        labels = real.fdr < np.float32(0.05)
    # A missing predicted gene counts as FDR 1 (cell-eval: fill_null(1.0)); so does a NaN here,
    # since a pandas table cannot tell a missing value from NaN.
    q = np.where(pred.present & ~np.isnan(pred.fdr), pred.fdr, np.float32(1.0)).astype(np.float32)
    scores = _neg_log10_float32(np.clip(q, _AUC_FDR_FLOOR, np.float32(1.0)))
    area = _average_precision if method == "pr" else _roc_auc
    out = []
    for i in range(de.perturbations.size):
        rows = real.present[i]
        y, s = labels[i, rows], scores[i, rows]
        n_pos = int(y.sum())
        out.append(math.nan if not (0 < n_pos < y.size) else area(y, s))
    return _per_pert(de, out)


register("pr_auc", kind="de", best=1.0, description="Average precision of significant-gene recovery", method="pr")(de_auc)
register("roc_auc", kind="de", best=1.0, description="ROC AUC of significant-gene recovery", method="roc")(de_auc)
