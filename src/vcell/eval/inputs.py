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

from vcell.data.spec import column_guess
from vcell.data.validate import check_expression, check_unique_genes
from vcell.errors import VcellError, did_you_mean, named_with_guess, preview

log = logging.getLogger(__name__)

INPUT_TYPES = ("auto", "log1p", "counts")


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


def _check_values(adata: ad.AnnData, where: str, input_type: str, option: str = "--expression") -> str:
    """Reject NaN/inf/negatives; decide (or check the declared) type: 'log1p' or 'counts'.

    The rules are the data layer's (:func:`~vcell.data.validate.check_expression`) with cell-eval's
    thresholds: the type is decided from the values alone, log1p data must stay below 15.
    """
    declared = None if input_type == "auto" else input_type
    return check_expression(adata, declared, where, option=option, cell_eval=True).type


def to_log1p(adata: ad.AnnData, where: str, input_type: str = "auto", option: str = "--expression",
             found: list[str] | None = None) -> ad.AnnData:
    """Check values (see :func:`check_pair`) and bring counts to log1p as cell-eval does.

    log1p input is returned as is; counts get normalize_total (median library size) + log1p,
    on a copy (the caller's object is never modified). ``option`` names the option that declares
    ``input_type`` in messages; ``found``, when given, gets the type the values are.
    """
    if input_type not in INPUT_TYPES:
        raise VcellError(f"{option} {input_type!r}: use one of {', '.join(INPUT_TYPES)}")
    kind = _check_values(adata, where, input_type, option)
    if found is not None:
        found.append(kind)
    if kind == "log1p":
        return adata
    import scanpy as sc  # only needed for counts input; slow to import

    log.info("%s: counts -> normalize_total (median library size) + log1p, as cell-eval does", where)
    adata = adata.to_memory() if adata.isbacked else adata.copy()
    if adata.X.dtype == np.float16:  # its sums overflow
        adata.X = adata.X.astype(np.float32)
    elif not sp.issparse(adata.X):
        adata.X = np.asarray(adata.X)
    if adata.n_obs and not (np.asarray(adata.X.sum(axis=1)).ravel() > 0).any():
        # normalize_total's target (the median of the positive totals) would be NaN, and so every value
        raise VcellError(f"{where}: every cell has 0 counts in total: counts cannot be normalised to log1p")
    sc.pp.normalize_total(adata)
    values = adata.X.data if sp.issparse(adata.X) else adata.X
    if not np.isfinite(values).all():
        raise VcellError(f"{where}: the counts normalised to the median library size are not finite "
                         f"(cell totals beyond the range of {adata.X.dtype})")
    sc.pp.log1p(adata)
    return adata


def perturbation_labels(adata: ad.AnnData, pert_col: str, where: str, control: str | None = None) -> pd.Series:
    """Each cell's perturbation label, as strings.

    A missing column (with the file's columns and a did-you-mean), unlabelled cells and, when
    ``control`` is given, a control label absent from the column are one-line errors naming ``where``.
    """
    if pert_col not in adata.obs.columns:
        raise VcellError(
            f"{where}: perturbation column {pert_col!r} not found in .obs{column_guess(pert_col, adata.obs.columns, 'perturbation')} "
            f"(columns: {preview(adata.obs.columns, 10, quote=False)}); pass --pert-col (pert_col=)"
        )
    labels = adata.obs[pert_col]
    if labels.isna().any():
        raise VcellError(f"{where}: column {pert_col!r} has {int(labels.isna().sum())} cells without a perturbation label")
    labels = labels.astype(str)
    if control is not None and control not in set(labels):
        values = labels.value_counts().index
        raise VcellError(
            f"{where}: control label {control!r} not found in column {pert_col!r}{did_you_mean(control, values)} "
            f"(most common: {preview(values, 5)}); pass --control (control=)"
        )
    return labels


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
    real_perts = perturbation_labels(real, pert_col, real_name, control)
    pred_perts = perturbation_labels(pred, pert_col, pred_name)
    if control not in set(pred_perts):
        values = pred_perts.value_counts().index
        raise VcellError(
            f"{pred_name}: no control cells ({control!r} in column {pert_col!r}{did_you_mean(control, values)}, as in {real_name}): "
            "the 2025 profile takes the controls from the prediction, as cell-eval 0.8 does; write the prediction with its "
            "controls (`vcell predict`'s log1p output, or --log1p-out beside counts), or score a submission without "
            "them with --profile vcc2026, which takes them from the reference"
        )
    for adata, where in ((real, real_name), (pred, pred_name)):
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise VcellError(f"{where}: no data ({adata.n_obs} cells x {adata.n_vars} genes)")
        check_unique_genes(adata.var_names, where)
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
    extra_perts = sorted(set(pred_perts) - set(real_perts))
    if missing_perts and extra_perts:  # a misspelled label: name it first, with what it may have meant
        hints = ", ".join(named_with_guess(e, missing_perts) for e in extra_perts[:3])
        raise VcellError(
            f"{pred_name}: unknown perturbation label(s) {hints} ({len(extra_perts)} not in {real_name}); "
            f"{len(missing_perts)} perturbation(s) of {real_name} missing from the prediction ({preview(missing_perts, quote=False)})"
        )
    if missing_perts:
        raise VcellError(f"{pred_name}: {len(missing_perts)} perturbation(s) of {real_name} missing from the prediction "
                         f"({preview(missing_perts, quote=False)}); predict every perturbation of {real_name} "
                         "(`vcell predict --perturbations data`), or score against real cells of those predicted only")
    if extra_perts:
        raise VcellError(f"{pred_name}: {len(extra_perts)} perturbation(s) not in {real_name} ({preview(extra_perts, quote=False)}); "
                         f"predict only the perturbations of {real_name} (`vcell predict --perturbations data`)")
    return sorted(wanted), reorder


def prepare(
    adata: ad.AnnData, where: str, input_type: str = "auto", genes: pd.Index | None = None, option: str = "--expression",
    found: list[str] | None = None,
) -> ad.AnnData:
    """One side, ready to score: in memory, genes in ``genes`` order (if given), log1p, values checked."""
    if genes is not None and not adata.var_names.equals(genes):
        adata = adata[:, genes]
    if adata.isbacked or adata.is_view:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    return to_log1p(adata, where, input_type, option, found)


def from_layer(adata: ad.AnnData, layer: str, where: str) -> ad.AnnData:
    """``adata`` with ``layers[layer]`` as its ``X`` (the matrix not copied); a missing layer is one error line."""
    if layer not in adata.layers:
        raise VcellError(f"{where}: no layers[{layer!r}] (layers: {preview(list(adata.layers), 5) or 'none'})")
    uns = {k: v for k, v in adata.uns.items() if k != "log1p"}  # scanpy's mark of X, not of the layer
    return ad.AnnData(X=adata.layers[layer], obs=adata.obs, var=adata.var, uns=uns)


def warn_mixed_spaces(real_name: str, real_kind: str, pred_name: str, pred_kind: str) -> None:
    """Warn when one side holds counts and the other log1p (as told from their values)."""
    if real_kind != pred_kind:
        log.warning("%s holds %s and %s holds %s (told from their values): the counts are normalised to their median library "
                    "size, the log1p values taken as they are; if those were normalised to another total (e.g. 1e4), the two "
                    "sides differ by that factor: give both in one space", real_name, real_kind, pred_name, pred_kind)


def check_pair(
    pred: ad.AnnData,
    real: ad.AnnData,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    input_type: str = "auto",
    pred_name: str = "pred",
    real_name: str = "real",
    option: str = "--expression",
) -> EvalPair:
    """Check a prediction against the truth and bring both to log1p with the same gene order.

    ``input_type`` (``auto``, ``log1p`` or ``counts``) is declared by ``option`` in messages.
    """
    if input_type not in INPUT_TYPES:
        raise VcellError(f"{option} {input_type!r}: use one of {', '.join(INPUT_TYPES)}")
    perts, reorder = check_structure(pred, real, pert_col, control, pred_name, real_name)
    found: list[str] = []
    real = prepare(real, real_name, input_type, option=option, found=found)
    pred = prepare(pred, pred_name, input_type, real.var_names if reorder else None, option, found)
    warn_mixed_spaces(real_name, found[0], pred_name, found[1])
    return EvalPair(real=real, pred=pred, pert_col=pert_col, control=control, perturbations=perts)
