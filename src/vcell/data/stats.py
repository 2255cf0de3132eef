"""Per-gene statistics accumulated over row blocks of a matrix, in memory or streamed from disk.

:class:`GeneMoments` adds up, per group of cells (e.g. batches) and per gene, the sum, the sum of
squares and the number of positive values. Rows are added in order into one float64 total, so a
matrix added as one block or as many blocks gives the same numbers to the last bit; highly
variable gene selection (:func:`vcell.data.gene_selection.hvg_table`) is computed from them.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import sparse


@numba.njit(cache=True, nogil=True)
def _csr_moments(indptr, indices, data, groups, sums, sumsq, npos):
    for r in range(indptr.size - 1):
        g = groups[r]
        if g < 0:
            continue
        for j in range(indptr[r], indptr[r + 1]):
            v = data[j]
            c = indices[j]
            sums[g, c] += v
            sumsq[g, c] += v * v  # the square in the values' dtype, as scanpy's mean/variance kernel
            if v > 0:
                npos[g, c] += 1


@numba.njit(cache=True, nogil=True)
def _dense_moments(x, groups, sums, sumsq, npos):
    for r in range(x.shape[0]):
        g = groups[r]
        if g < 0:
            continue
        for c in range(x.shape[1]):
            v = x[r, c]
            if v != 0:
                sums[g, c] += v
                sumsq[g, c] += v * v
                if v > 0:
                    npos[g, c] += 1


class GeneMoments:
    """Per-group, per-gene sums of ``x`` and ``x**2`` (float64) and counts of ``x > 0``.

    Parameters
    ----------
    n_vars
        Number of genes (columns).
    n_groups
        Number of cell groups (1 without batches).
    """

    def __init__(self, n_vars: int, n_groups: int = 1):
        self.sums = np.zeros((n_groups, n_vars), dtype=np.float64)
        self.sumsq = np.zeros((n_groups, n_vars), dtype=np.float64)
        self.npos = np.zeros((n_groups, n_vars), dtype=np.int64)
        self.n_cells = np.zeros(n_groups, dtype=np.int64)

    def add(self, block, groups: np.ndarray | None = None) -> None:
        """Add the rows of ``block`` (CSR or dense); ``groups[r]`` is row r's group, -1 to skip it."""
        n = block.shape[0]
        groups = np.zeros(n, dtype=np.int64) if groups is None else np.ascontiguousarray(groups, dtype=np.int64)
        if sparse.issparse(block):
            block = block if block.format == "csr" else block.tocsr()
            _csr_moments(block.indptr, block.indices, block.data, groups, self.sums, self.sumsq, self.npos)
        else:
            _dense_moments(np.ascontiguousarray(block), groups, self.sums, self.sumsq, self.npos)
        self.n_cells += np.bincount(groups[groups >= 0], minlength=len(self.n_cells))

    def mean_var(self, group: int = 0, genes: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance per gene in ``group`` (scanpy's formula: E[x²] - E[x]², times n/(n-1))."""
        n = int(self.n_cells[group])
        mean = self.sums[group, genes] / n
        var = self.sumsq[group, genes] / n - mean**2
        if n != 1:
            var *= n / (n - 1)
        return mean, var
