"""Per-group sums and means of matrix rows, in float64, block by block (backed files too).

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


def group_sums(X, codes: np.ndarray, n_groups: int, chunk_rows: int = 2048) -> np.ndarray:
    """``[n_groups, n_genes]`` float64 sums of the rows of ``X`` by group code (``-1``: skipped)."""
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
            _csr_group_sums(block.data, block.indices, block.indptr, block_codes, out)
        else:
            _dense_group_sums(np.ascontiguousarray(np.asarray(block)), block_codes, out)
    return out


def group_means(X, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """``[n_groups, n_genes]`` float64 means of the rows of ``X`` per group; empty groups are an error."""
    sizes = np.bincount(np.asarray(codes)[np.asarray(codes) >= 0], minlength=n_groups).astype(np.float64)
    if np.any(sizes == 0):
        raise VcellError(f"{int((sizes == 0).sum())} group(s) have no cells")
    return group_sums(X, codes, n_groups) / sizes[:, None]
