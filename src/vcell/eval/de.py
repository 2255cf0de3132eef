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
thread; a CSR matrix is never densified nor converted to CSC as a whole.
The kernels live in :mod:`vcell.eval._de_kernels`; this module groups the cells, hands out the
blocks and builds the results.

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

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.errors import VcellError, preview
from vcell.eval._de_kernels import (
    _MEAN_DENSE,
    _MEAN_SPARSE,
    _csr_chunk,
    _dense_buffers,
    _dense_chunk,
    _expm1,
    _fold_changes,
)

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
COLUMNS = (
    "target",
    "feature",
    "target_mean",
    "ref_mean",
    "target_membership",
    "ref_membership",
    "log2_fold_change",
    "percent_change",
    "p_value",
    "statistic",
    "fdr",
)

_WORK_ENTRIES = 4_000_000  # per-thread gather buffer of the dense kernel, in matrix entries


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


def _n_threads(threads: int | None) -> int:
    """``threads`` (``None`` or < 1: every CPU this process may use)."""
    if threads is None or threads < 1:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return int(threads)


def _prepare_matrix(X):
    """``("dense", array)`` or ``("csr", csr)`` with float32/float64 values, no copy when possible."""
    if X is None:
        raise VcellError("the expression matrix is missing (adata.X is None)")
    if sp.issparse(X):
        if X.format != "csr":
            X = sp.csr_matrix(X)
        if not X.has_canonical_format:  # unsorted column indices or duplicates
            X = X.copy()
            X.sum_duplicates()
        if X.dtype == np.float16:
            X = X.astype(np.float32)
        elif X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        return "csr", X
    if hasattr(X, "to_memory"):  # anndata backed sparse dataset: load it
        X = X.to_memory()
    if sp.issparse(X):
        return _prepare_matrix(X)
    if type(X) is not np.ndarray:  # np.matrix, h5py dataset, ...
        X = np.asarray(X)
    if X.ndim != 2:
        raise VcellError(f"the expression matrix must be 2-D, got shape {X.shape}")
    if X.dtype == np.float16:
        X = X.astype(np.float32)
    elif X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    if not X.flags.c_contiguous:
        X = np.ascontiguousarray(X)
    return "dense", X


def _groups(labels, reference) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group the cells: ``(names, gid, order, gptr, sizes)``.

    Group 0 is the reference, then every other non-empty label in category order (sorted for
    plain strings, as ``pd.Categorical``); empty strings and missing labels are left out.
    ``gid`` is the group of each row (-1: left out). ``order`` lists the rows of group 0, then
    1, ... (each in row order); group ``g`` is ``order[gptr[g]:gptr[g + 1]]`` and has
    ``sizes[g]`` cells.
    """
    cat = pd.Categorical(labels)
    cats = np.asarray(cat.categories, dtype=object)
    codes = np.asarray(cat.codes, dtype=np.int64)
    keep_cat = np.array([not (isinstance(c, str) and c == "") and not pd.isna(c) for c in cats], dtype=bool)
    is_ref = np.array([c == reference for c in cats], dtype=bool) & keep_cat
    if not is_ref.any():
        shown = preview(cats[keep_cat], 10, quote=False)
        raise VcellError(f"control group {reference!r} not found among the perturbation labels ({shown})")
    counts = np.bincount(codes[codes >= 0], minlength=len(cats))
    ref_code = int(np.flatnonzero(is_ref)[0])
    if counts[ref_code] == 0:
        raise VcellError(f"control group {reference!r} has no cells")
    others = [c for c in range(len(cats)) if keep_cat[c] and c != ref_code and counts[c] > 0]
    gid_of_code = np.full(len(cats) + 1, -1, dtype=np.int64)  # last slot: code -1 (missing label)
    gid_of_code[ref_code] = 0
    gid_of_code[others] = np.arange(1, len(others) + 1)
    gid = gid_of_code[codes]
    rows = np.flatnonzero(gid >= 0)
    order = rows[np.argsort(gid[rows], kind="stable")].astype(np.int64)
    sizes = np.bincount(gid[rows], minlength=len(others) + 1).astype(np.int64)
    gptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    names = np.empty(len(others), dtype=object)
    names[:] = [cats[c] for c in others]
    return names, gid, order, gptr, sizes


def _block_genes(kind: str, n_rows: int, n_genes: int, threads: int, block_genes: int | None) -> int:
    if block_genes:
        return max(1, int(block_genes))
    if kind == "dense":  # gather buffer of block x n_rows values per thread
        b = _WORK_ENTRIES // max(n_rows, 1)
        return int(min(256, max(8, b)))
    # CSR: every block re-locates its slice of each row (binary search), so fewer, larger blocks;
    # still at least a few blocks per thread for load balance
    return int(min(1024, max(32, -(-n_genes // (4 * max(threads, 1))))))


def _run(X, labels, reference, threads, block_genes):
    kind, M = _prepare_matrix(X)
    n_obs, n_genes = M.shape
    if len(labels) != n_obs:
        raise VcellError(f"{len(labels)} perturbation labels for a matrix of {n_obs} cells")
    names, gid, order, gptr, sizes = _groups(labels, reference)
    dtype = M.dtype
    n_t = len(names)
    stat = np.empty((n_t, n_genes), np.float64)
    pval = np.empty((n_t, n_genes), np.float64)
    means = np.empty((n_t + 1, n_genes), dtype)
    sums = np.zeros((n_t + 1, n_genes), np.float64)
    if kind == "dense":
        mean_mode = _MEAN_DENSE
        scale = sizes.astype(dtype)  # numpy mean: sum, then divide by n in the array dtype
    else:
        mean_mode = _MEAN_SPARSE
        scale = (1.0 / sizes.astype(np.float64)).astype(dtype)  # scipy mean: sum of x * (1/n)
    if n_genes == 0 or n_t == 0:
        return names, sizes, stat, pval, means, sums
    n_threads = _n_threads(threads)
    chunk = _block_genes(kind, len(order), n_genes, n_threads, block_genes)
    starts = range(0, n_genes, chunk)
    groups = (gptr, sizes, scale, mean_mode)
    if kind == "dense":
        local = threading.local()

        def work(j0):
            bufs = getattr(local, "bufs", None)
            if bufs is None:
                bufs = local.bufs = _dense_buffers(chunk, int(gptr[-1]), len(sizes), M.dtype)
            return _dense_chunk(M, gid, *groups, j0, min(n_genes, j0 + chunk), stat, pval, means, sums, *bufs)

    else:
        data, indices, indptr = M.data, M.indices, M.indptr

        def work(j0):
            return _csr_chunk(data, indices, indptr, order, *groups, j0, min(n_genes, j0 + chunk), stat, pval, means, sums)

    if n_threads == 1 or len(starts) == 1:
        bad = [work(j0) for j0 in starts]
    else:  # the kernels release the GIL: blocks run in parallel, handed out as threads free up
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            bad = list(pool.map(work, starts))
    if any(bad):
        raise VcellError("the expression matrix contains NaN values; differential expression needs finite values")
    return names, sizes, stat, pval, means, sums


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
    names, sizes, stat, pval, _, _ = _run(X, labels, reference, threads, block_genes)
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
) -> DEResult:
    """Differential expression of each perturbation against the control, as arrays.

    Parameters
    ----------
    X : numpy array or scipy sparse matrix, cells x genes
        log1p expression (float32 or float64; float16 is read as float32, integers as float64).
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

    Returns
    -------
    DEResult
    """
    if epsilon < 0:
        raise VcellError(f"epsilon must be >= 0, got {epsilon}")
    names, sizes, stat, pval, means, sums = _run(X, labels, control, threads, block_genes)
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
