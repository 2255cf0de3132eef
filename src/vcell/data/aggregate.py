"""Per-group sums and means of matrix rows, in float64, block by block (backed files too), and the
cell-mean baseline vector (:func:`cell_mean`) built on them.

One numba pass per row block: no float64 copy of the matrix, no densified sparse matrix.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from vcell.errors import VcellError


@numba.njit(cache=True, nogil=True)
def _dense_group_sums(block, codes, out):
    n, g = block.shape
    for i in range(n):
        c = codes[i]
        if c < 0:
            continue
        for j in range(g):
            out[c, j] += block[i, j]


@numba.njit(cache=True, nogil=True)
def _csr_group_sums(data, indices, indptr, codes, out):
    for i in range(indptr.size - 1):
        c = codes[i]
        if c < 0:
            continue
        for k in range(indptr[i], indptr[i + 1]):
            out[c, indices[k]] += data[k]


def group_sums(X, codes: np.ndarray, n_groups: int, chunk_rows: int = 2048, transform=None) -> np.ndarray:
    """``[n_groups, n_genes]`` float64 sums of the rows of ``X`` by group code (``-1``: skipped),
    of ``transform(values)`` when given (a function keeping 0 at 0, e.g. ``np.expm1``)."""
    codes = np.asarray(codes, dtype=np.int64)
    if sp.issparse(X) and not sp.isspmatrix_csr(X):
        X = sp.csr_matrix(X)
    if codes.shape[0] != X.shape[0]:
        raise VcellError(f"{codes.shape[0]} group codes for a matrix of {X.shape[0]} rows")
    out = np.zeros((n_groups, X.shape[1]), dtype=np.float64)
    for start in range(0, X.shape[0], chunk_rows):
        block_codes = codes[start : start + chunk_rows]
        if not np.any(block_codes >= 0):
            continue  # a block with no wanted row is never read (backed files: no I/O)
        block = X[start : start + block_codes.size]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            block.sum_duplicates()
            data = block.data
            if transform is not None or data.dtype == np.float16:  # numba has no float16
                data = data.astype(np.float64)
                data = data if transform is None else transform(data)
            _csr_group_sums(data, block.indices, block.indptr, block_codes, out)
        else:
            block = np.asarray(block)
            block = block.astype(np.float32) if block.dtype == np.float16 else block  # numba has no float16
            _dense_group_sums(np.ascontiguousarray(block if transform is None else transform(block.astype(np.float64))), block_codes, out)
    return out


def group_means(X, codes: np.ndarray, n_groups: int, transform=None) -> np.ndarray:
    """``[n_groups, n_genes]`` float64 means of the rows of ``X`` per group; empty groups are an error."""
    sizes = np.bincount(np.asarray(codes)[np.asarray(codes) >= 0], minlength=n_groups).astype(np.float64)
    if np.any(sizes == 0):
        raise VcellError(f"{int((sizes == 0).sum())} group(s) have no cells")
    return group_sums(X, codes, n_groups, transform=transform) / sizes[:, None]


def cell_mean(
    X,
    codes: np.ndarray,
    control: int,
    n_groups: int | None = None,
    *,
    as_delta: bool = False,
    match_dtype: bool = False,
    transform=None,
) -> np.ndarray:
    """The "cell-mean" baseline vector: the mean over groups of each group's mean row.

    Every group (the control group included) weighs the same, whatever its number of cells; this
    is the vector the Virtual Cell Challenge's cell-mean baseline predicts for every perturbed
    cell (``cell-eval baseline``).

    Parameters
    ----------
    X : array-like, sparse matrix or backed dataset, shape (n_cells, n_genes)
        Expression (log1p), read in row blocks as :func:`group_sums` does.
    codes : numpy.ndarray of int, shape (n_cells,)
        Group of each row, ``0 .. n_groups - 1``; ``-1`` leaves the row out.
    control : int
        Code of the control group.
    n_groups : int, optional
        Number of groups (default ``codes.max() + 1``); every group must have rows.
    as_delta : bool
        Return the mean over the non-control groups of (group mean - control mean) instead.
    match_dtype : bool
        Round each group mean to the floating dtype of ``X`` before averaging (cell-eval's polars
        group means of float32 data are float32); the average is then taken in that dtype.
        ``False`` keeps float64 throughout.
    transform : callable, optional
        Applied to the values before the group means (e.g. ``np.expm1``: the mean of normalised
        expression rather than of log1p).

    Returns
    -------
    numpy.ndarray, shape (n_genes,)
        The baseline vector (float64, or ``X``'s floating dtype with ``match_dtype``).
    """
    codes = np.asarray(codes)
    if n_groups is None:
        n_groups = int(codes.max()) + 1 if codes.size else 0
    if not 0 <= control < n_groups:
        raise VcellError(f"control group code {control} is outside the {n_groups} groups")
    means = group_means(X, codes, n_groups, transform)
    if match_dtype and np.issubdtype(X.dtype, np.floating):
        means = means.astype(X.dtype)
    is_ctrl = np.arange(n_groups) == control
    if as_delta:
        return (means[~is_ctrl] - means[is_ctrl]).mean(axis=0)
    return means.mean(axis=0)
