"""Differential expression of every perturbation against the control group.

What is computed (the definitions cell-eval 0.8.2 uses through pdex 0.3.0, ``mode="ref"``,
``is_log1p=True``, ``geometric_mean=True``, ``epsilon=0``; see
``/work/shared/reference/metrics.md``), per perturbation ``t`` and gene:

* ``statistic``, ``p_value``: two-sided Mann-Whitney U of the cells of ``t`` against the control
  cells, normal approximation with tie and continuity correction, i.e.
  ``scipy.stats.mannwhitneyu(x_t, x_ref, method="asymptotic")``; ``statistic`` is U of ``t``.
  A gene whose values are all equal in both groups (zero variance) gets ``p_value = 1``.
* ``fdr``: Benjamini-Hochberg over the genes of one perturbation.
* ``target_mean``, ``ref_mean``: pseudobulk ``expm1(mean over cells of the log1p values)``, in the
  dtype of the input matrix (float32 in -> float32 out, as pdex).
* ``log2_fold_change = log2((target_mean + eps) / (ref_mean + eps))``,
  ``percent_change = (target_mean - ref_mean) / (ref_mean + eps)``; ``0/0`` gives ``0``,
  ``x/0`` gives ``+-inf``.

How (speed): genes are processed in blocks on ``threads`` Python threads (numba kernels that
release the GIL; blocks are handed out as threads free up). Within a block, each gene's non-zero
values are gathered once, control first then each perturbation, each in row order; zeros are
never stored or sorted: the zero block of a gene is one tie group, handled analytically. The
control's non-zeros of a gene are sorted once (a bucket sort, linear on expression data) and a
bucket table finds the position of any value among them in O(1) expected time. U of a
perturbation is then counted directly, U = sum over its cells x of #(control < x) +
#(control == x) / 2, without sorting the perturbation's values, and the tie term of the pooled
sample is updated as cells join values already present. Memory is bounded by one block per
thread; a CSR matrix is never densified nor converted to CSC as a whole. A matrix on disk
(a :class:`~vcell.eval.tiles.TileStore`) is tested one band of genes at a time.
The kernels live in :mod:`vcell.eval._de_kernels`, the work distribution (groups, blocks,
threads, bands) in :mod:`vcell.eval._de_engine`; this module builds the results.

Exactness: U and the tie term are exact integer counts, and p is computed with the same
floating-point expression as pdex, so ``statistic``, ``p_value`` and ``fdr`` are bit-identical
to pdex (and equal to scipy up to the last bits of ``erfc``). The means reproduce the float
arithmetic pdex gets from numpy (dense: sum in row order in the input dtype, then divide) and
from scipy (CSR: sum in row order of ``x * (1/n)``), so they too are bit-identical to cell-eval
for the same storage. For float32 input, dense and CSR storage of one matrix therefore give
means that differ by float32 rounding (up to ~1e-5 relative over thousands of cells), exactly
as cell-eval's do; tests, FDR and significant sets do not depend on the storage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError, preview
from vcell.eval._de_engine import run_tests
from vcell.eval._de_kernels import _expm1, _fold_changes
from vcell.eval.csvio import COLUMNS_DE

__all__ = [
    "COLUMNS",
    "DEResult",
    "MannWhitneyResult",
    "bh_fdr",
    "de_arrays",
    "differential_expression",
    "mannwhitney_vs_reference",
]

#: Columns of the long DE table, in the order cell-eval writes ``real_de.csv`` / ``pred_de.csv``.
COLUMNS = COLUMNS_DE  # defined with the CSV format, which imports nothing of the DE engine

# --------------------------------------------------------------------------------------------
# Python layer
# --------------------------------------------------------------------------------------------


@dataclass
class MannWhitneyResult:
    """Mann-Whitney U of each group against the reference group, per gene.

    ``statistic`` and ``pvalue`` are ``(len(groups), n_genes)`` float64 arrays; row ``i`` is
    ``groups[i]`` (``n_cells[i]`` cells) against the reference (``n_reference`` cells).
    """

    groups: np.ndarray
    n_cells: np.ndarray
    n_reference: int
    statistic: np.ndarray
    pvalue: np.ndarray


@dataclass
class DEResult:
    """Differential expression of each target against the reference, as ``(target, gene)`` arrays.

    Array fields are ``(len(targets), len(features))`` except ``ref_mean`` (per gene) and
    ``target_membership`` (per target). :meth:`to_frame` gives cell-eval's long table.
    ``log_sums`` (``(1 + len(targets), len(features))`` float64, the reference first) are the
    sums of the log1p values per group in row order: pseudobulks without another pass.
    """

    targets: np.ndarray
    features: np.ndarray
    reference: object
    target_membership: np.ndarray
    ref_membership: int
    target_mean: np.ndarray
    ref_mean: np.ndarray
    log2_fold_change: np.ndarray
    percent_change: np.ndarray
    p_value: np.ndarray
    statistic: np.ndarray
    fdr: np.ndarray
    log_sums: np.ndarray | None = None

    def to_frame(self) -> pd.DataFrame:
        """The long table of cell-eval's ``real_de.csv``: one row per (target, feature), targets in
        group order, genes in ``var`` order, columns :data:`COLUMNS` with pdex's dtypes."""
        n_t, n_f = self.p_value.shape
        return pd.DataFrame(
            {
                "target": np.repeat(np.asarray(self.targets, dtype=object), n_f),
                "feature": np.tile(np.asarray(self.features, dtype=object), n_t),
                "target_mean": self.target_mean.reshape(-1),
                "ref_mean": np.tile(self.ref_mean, n_t),
                "target_membership": np.repeat(np.asarray(self.target_membership, dtype=np.int64), n_f),
                "ref_membership": np.full(n_t * n_f, self.ref_membership, dtype=np.int64),
                "log2_fold_change": self.log2_fold_change.reshape(-1),
                "percent_change": self.percent_change.reshape(-1),
                "p_value": self.p_value.reshape(-1),
                "statistic": self.statistic.reshape(-1),
                "fdr": self.fdr.reshape(-1),
            },
            columns=list(COLUMNS),
            copy=False,  # the arrays are fresh (or views of this result): no consolidated copy
        )


def bh_fdr(pvals, axis: int = -1) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values along ``axis`` (each slice is one family).

    Same arithmetic as ``scipy.stats.false_discovery_control(method="bh")``; NaN p-values are
    counted as 1 (scipy rejects them). Returns a new float64 array of the input's shape.
    """
    p = np.array(pvals, dtype=np.float64)  # copy
    if p.ndim == 0:
        return np.float64(1.0) if np.isnan(p) else p
    p[np.isnan(p)] = 1.0
    if np.any((p < 0) | (p > 1)):
        raise VcellError("bh_fdr: p-values must lie in [0, 1]")
    p = np.moveaxis(p, axis, -1)
    m = p.shape[-1]
    if m <= 1:
        return np.moveaxis(p, -1, axis)
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1)
    ranked *= m / np.arange(1, m + 1, dtype=np.float64)
    rev = ranked[..., ::-1]
    np.minimum.accumulate(rev, axis=-1, out=rev)
    out = np.empty_like(ranked)
    np.put_along_axis(out, order, ranked, axis=-1)
    np.clip(out, 0.0, 1.0, out=out)
    return np.moveaxis(out, -1, axis)


def mannwhitney_vs_reference(
    X, labels, reference="non-targeting", *, threads: int | None = 2, block_genes: int | None = None
) -> MannWhitneyResult:
    """Mann-Whitney U of every group of cells against the reference group, for every gene.

    Parameters
    ----------
    X : numpy array or scipy sparse matrix, cells x genes
        Expression values (any real values; zeros are exploited when frequent).
    labels : array-like of length n_cells
        Group of each cell; empty strings and missing labels are ignored.
    reference : str
        Label of the reference (control) group.
    threads : int or None
        Numba threads (``None`` or 0: all available).
    block_genes : int, optional
        Genes per work block (default: chosen from the matrix shape).

    Returns
    -------
    MannWhitneyResult
        Groups in category order (reference excluded), ``statistic`` = U of the group,
        ``pvalue`` two-sided, identical to ``scipy.stats.mannwhitneyu(method="asymptotic")``
        (p = 1 where every value is equal).
    """
    names, sizes, stat, pval, _, _ = run_tests(X, labels, reference, threads, block_genes)
    return MannWhitneyResult(names, sizes[1:].copy(), int(sizes[0]), stat, pval)


def de_arrays(
    X,
    labels,
    control="non-targeting",
    *,
    var_names: Sequence | None = None,
    threads: int | None = 2,
    epsilon: float = 0.0,
    block_genes: int | None = None,
    budget: float = math.inf,
    progress: Progress = no_progress,
) -> DEResult:
    """Differential expression of each perturbation against the control, as arrays.

    Parameters
    ----------
    X : numpy array, scipy sparse matrix or :class:`~vcell.eval.tiles.TileStore`, cells x genes
        log1p expression (float32 or float64; float16 is read as float32, integers as float64);
        a tile store on disk is read band by band (:func:`vcell.eval.bands.sweep`).
    labels : array-like of length n_cells
        Perturbation of each cell (a pandas categorical keeps its category order).
    control : str
        Label of the control cells.
    var_names : sequence, optional
        Gene names (default ``"0", "1", ...``).
    threads : int or None
        Numba threads (``None`` or 0: all available).
    epsilon : float
        Pseudocount of the fold changes (cell-eval's default 0).
    block_genes : int, optional
        Genes per work block (default: chosen from the matrix shape).
    budget : float
        Bytes of a tile store's bands read at once (half of it each; see :mod:`vcell.eval.bands`).
    progress : callable
        Progress line over the bands (``vcell.train.display.task``'s signature).

    Returns
    -------
    DEResult
    """
    if epsilon < 0:
        raise VcellError(f"epsilon must be >= 0, got {epsilon}")
    names, sizes, stat, pval, means, sums = run_tests(X, labels, control, threads, block_genes, budget, progress)
    n_genes = means.shape[1]
    features = np.asarray(var_names if var_names is not None else [str(i) for i in range(n_genes)], dtype=object)
    if features.shape != (n_genes,):
        raise VcellError(f"{features.size} gene names for a matrix of {n_genes} genes")
    bulk = _expm1(means.reshape(-1)).reshape(means.shape)
    lfc = np.empty(stat.shape, np.float64)
    pc = np.empty(stat.shape, np.float64)
    if stat.size:
        _fold_changes(bulk[1:], bulk[0], float(epsilon), lfc, pc)
    return DEResult(
        targets=names,
        features=features,
        reference=control,
        target_membership=sizes[1:].copy(),
        ref_membership=int(sizes[0]),
        target_mean=bulk[1:],
        ref_mean=bulk[0],
        log2_fold_change=lfc,
        percent_change=pc,
        p_value=pval,
        statistic=stat,
        fdr=bh_fdr(pval, axis=-1),
        log_sums=sums,
    )


def differential_expression(
    adata,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    *,
    threads: int | None = 2,
    epsilon: float = 0.0,
    layer: str | None = None,
    block_genes: int | None = None,
) -> pd.DataFrame:
    """cell-eval's DE table (``real_de.csv`` / ``pred_de.csv``) of an AnnData.

    Parameters
    ----------
    adata : anndata.AnnData
        log1p-normalised expression in ``X`` (or ``layers[layer]``), dense or sparse.
    pert_col : str
        ``obs`` column with the perturbation of each cell.
    control : str
        Label of the control cells.
    threads : int or None
        Numba threads (``None`` or 0: all available).
    epsilon : float
        Pseudocount of the fold changes (cell-eval's default 0).
    layer : str, optional
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    block_genes : int, optional
        Genes per work block (default: chosen from the matrix shape).

    Returns
    -------
    pandas.DataFrame
        One row per (perturbation, gene), columns :data:`COLUMNS`: ``target``, ``feature``
        (object), ``target_mean``, ``ref_mean`` (the matrix dtype), ``target_membership``,
        ``ref_membership`` (int64), ``log2_fold_change``, ``percent_change``, ``p_value``,
        ``statistic``, ``fdr`` (float64). Perturbations with no cells are left out.
    """
    if pert_col not in adata.obs.columns:
        shown = preview(adata.obs.columns, 20, quote=False)
        raise VcellError(f"perturbation column {pert_col!r} not found in obs (columns: {shown})")
    if layer is not None:
        if layer not in adata.layers:
            raise VcellError(f"layer {layer!r} not found (layers: {', '.join(adata.layers.keys()) or 'none'})")
        X = adata.layers[layer]
    else:
        X = adata.X
    res = de_arrays(
        X,
        adata.obs[pert_col],
        control,
        var_names=adata.var_names,
        threads=threads,
        epsilon=epsilon,
        block_genes=block_genes,
    )
    return res.to_frame()
