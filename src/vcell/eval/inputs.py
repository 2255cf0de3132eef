"""Loading and checking a (prediction, truth) pair for evaluation.

Stricter than cell-eval: the same gene set in another order is reordered (and logged) instead of
failing; a different gene set, missing perturbations, a missing control, NaN/inf or negative
values, and counts where log1p is declared (or the reverse) each stop with one line naming the
file and the offending genes, perturbations or values. Nothing is written before these pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.validate import scan_matrix
from vcell.errors import VcellError, preview

log = logging.getLogger(__name__)

INPUT_TYPES = ("auto", "log1p", "counts")
FRACTION_EPS = 1e-3  # a value counts as fractional when its fractional part exceeds this (as cell-eval)
MAX_LOG1P = 15.0  # log1p data at or above this is rejected as mislabelled counts (as cell-eval)


@dataclass
class EvalPair:
    """A checked prediction/truth pair, genes in the same order, both log1p."""

    real: ad.AnnData
    pred: ad.AnnData
    pert_col: str
    control: str
    perturbations: list[str]
    real_path: Path | None = None
    pred_path: Path | None = None

    @property
    def genes(self) -> pd.Index:
        """Gene names (shared by both)."""
        return self.real.var_names


def _check_values(adata: ad.AnnData, where: str, input_type: str) -> str:
    """Reject NaN/inf/negatives; decide (or check the declared) type: 'log1p' or 'counts'."""
    stats = scan_matrix(adata.X, frac_eps=FRACTION_EPS)
    if stats.nan is not None:
        r, c = stats.nan
        raise VcellError(f"{where}: X contains NaN or infinite values (first at cell {adata.obs_names[r]!r}, gene {adata.var_names[c]!r})")
    if stats.negative is not None:
        r, c, v = stats.negative
        raise VcellError(f"{where}: X contains negative values (first {v:g} at cell {adata.obs_names[r]!r}, gene {adata.var_names[c]!r}); expected log1p expression")
    fractional, hi = stats.has_fraction, stats.max_value
    found = "log1p" if fractional else "counts"
    if input_type == "log1p" and found == "counts":
        raise VcellError(f"{where}: --input-type log1p but every value is an integer (max {hi:g}): these look like raw counts; pass --input-type counts")
    if input_type == "counts" and found == "log1p":
        raise VcellError(f"{where}: --input-type counts but X has non-integer values: pass --input-type log1p")
    if found == "log1p" and hi >= MAX_LOG1P:
        raise VcellError(
            f"{where}: X has values up to {hi:g}, out of the log1p range [0, {MAX_LOG1P:g}): raw counts that are not integers, "
            "or another scale; give log1p(normalised counts) or integer counts"
        )
    if input_type == "auto":
        why = "non-integer values, max below 15" if fractional else "every value is an integer"
        log.info("%s: input type inferred as %s (%s); pass --input-type to declare it", where, found, why)
    return found


def to_log1p(adata: ad.AnnData, where: str, input_type: str = "auto") -> ad.AnnData:
    """Check values (see :func:`check_pair`) and bring counts to log1p as cell-eval does.

    log1p input is returned as is; counts get normalize_total (median library size) + log1p,
    on a copy (the caller's object is never modified).
    """
    if input_type not in INPUT_TYPES:
        raise VcellError(f"--input-type {input_type!r}: use one of {', '.join(INPUT_TYPES)}")
    if _check_values(adata, where, input_type) == "log1p":
        return adata
    import scanpy as sc  # only needed for counts input; slow to import

    log.info("%s: counts -> normalize_total (median library size) + log1p, as cell-eval does", where)
    adata = adata.to_memory() if adata.isbacked else adata.copy()
    if not sp.issparse(adata.X):
        adata.X = np.asarray(adata.X, dtype=np.float32 if adata.X.dtype == np.float16 else adata.X.dtype)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    return adata


def _perturbations(adata: ad.AnnData, pert_col: str, where: str) -> pd.Series:
    if pert_col not in adata.obs.columns:
        raise VcellError(f"{where}: perturbation column {pert_col!r} not found in .obs (columns: {preview(adata.obs.columns, 10, quote=False)})")
    labels = adata.obs[pert_col]
    if labels.isna().any():
        raise VcellError(f"{where}: column {pert_col!r} has {int(labels.isna().sum())} cells without a perturbation label")
    return labels.astype(str)


def check_structure(
    pred: ad.AnnData,
    real: ad.AnnData,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    pred_name: str = "pred",
    real_name: str = "real",
) -> tuple[list[str], bool]:
    """Check columns, labels, genes and perturbations (no matrix read; backed files are fine).

    Returns the perturbations (control excluded, sorted) and whether pred's genes must be
    reordered to the real order.
    """
    real_perts = _perturbations(real, pert_col, real_name)
    pred_perts = _perturbations(pred, pert_col, pred_name)
    for labels, where in ((real_perts, real_name), (pred_perts, pred_name)):
        if control not in set(labels):
            raise VcellError(f"{where}: control label {control!r} not found in column {pert_col!r}")
    for adata, where in ((real, real_name), (pred, pred_name)):
        if not adata.var_names.is_unique:
            dup = adata.var_names[adata.var_names.duplicated()].unique()
            raise VcellError(f"{where}: duplicated gene names ({preview(dup, quote=False)})")
    reorder = False
    if not real.var_names.equals(pred.var_names):
        missing = real.var_names.difference(pred.var_names, sort=False)
        extra = pred.var_names.difference(real.var_names, sort=False)
        if len(missing) or len(extra):
            parts = []
            if len(missing):
                parts.append(f"{len(missing)} gene(s) of {real_name} missing ({preview(missing, quote=False)})")
            if len(extra):
                parts.append(f"{len(extra)} gene(s) not in {real_name} ({preview(extra, quote=False)})")
            raise VcellError(f"{pred_name}: genes differ from {real_name}: " + "; ".join(parts))
        log.info("%s: same genes as %s in another order: reordered to match", pred_name, real_name)
        reorder = True
    wanted = [p for p in pd.unique(real_perts) if p != control]
    have = set(pred_perts)
    missing_perts = [p for p in wanted if p not in have]
    if missing_perts:
        raise VcellError(f"{pred_name}: {len(missing_perts)} perturbation(s) of {real_name} missing from the prediction ({preview(missing_perts, quote=False)})")
    extra_perts = sorted(set(pred_perts) - set(real_perts))
    if extra_perts:
        raise VcellError(f"{pred_name}: {len(extra_perts)} perturbation(s) not in {real_name} ({preview(extra_perts, quote=False)})")
    return sorted(wanted), reorder


def prepare(adata: ad.AnnData, where: str, input_type: str = "auto", genes: pd.Index | None = None) -> ad.AnnData:
    """One side, ready to score: in memory, genes in ``genes`` order (if given), log1p, values checked."""
    if genes is not None and not adata.var_names.equals(genes):
        adata = adata[:, genes]
    if adata.isbacked or adata.is_view:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    return to_log1p(adata, where, input_type)


def check_pair(
    pred: ad.AnnData,
    real: ad.AnnData,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    input_type: str = "auto",
    pred_name: str = "pred",
    real_name: str = "real",
) -> EvalPair:
    """Check a prediction against the truth and bring both to log1p with the same gene order."""
    if input_type not in INPUT_TYPES:
        raise VcellError(f"--input-type {input_type!r}: use one of {', '.join(INPUT_TYPES)}")
    perts, reorder = check_structure(pred, real, pert_col, control, pred_name, real_name)
    real = prepare(real, real_name, input_type)
    pred = prepare(pred, pred_name, input_type, real.var_names if reorder else None)
    return EvalPair(real=real, pred=pred, pert_col=pert_col, control=control, perturbations=perts)
