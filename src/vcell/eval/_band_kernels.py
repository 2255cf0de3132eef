"""numba kernels of the gene-band store (:mod:`vcell.eval.bands`): split rows into gene tiles.

A chunk of CSR rows (sorted column indices) is cut into the parts of each tile (a range of
genes): :func:`tile_counts` finds each selected row's run of entries per tile, :func:`tile_fill`
copies them tile after tile, each tile's entries in row order with their global column index.
:func:`tile_fill_compact` does it into the files' compact form (uint16 offsets, uint16 counts).
:func:`row_totals` sums rows (float64, index order) and finds the first value that is not a count.
:func:`remap_columns` renumbers the columns of a chunk (a file whose genes come in another
order) and sorts each row again; :func:`is_canonical` tells whether every row is strictly sorted.
:func:`dense_row_counts` and :func:`dense_fill` turn a block of dense rows into CSR.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def tile_counts(indices, indptr, sel, bounds, counts, pos):
    """``counts[t, q]``: entries of row ``sel[q]`` in tile ``t`` (genes ``bounds[t]:bounds[t + 1]``);
    ``pos[q, t]``: where they start. One walk along each row (its columns are sorted)."""
    n_t = bounds.shape[0] - 1
    for q in range(sel.shape[0]):
        r = sel[q]
        k = indptr[r]
        end = indptr[r + 1]
        for t in range(n_t):
            pos[q, t] = k
            b = bounds[t + 1]
            while k < end and indices[k] < b:
                k += 1
            counts[t, q] = k - pos[q, t]


@nb.njit(cache=True, nogil=True)
def tile_fill(data, indices, sel, counts, pos, starts, t0, t1, out_data, out_idx):
    """Copy tiles ``t0:t1`` of rows ``sel``: tile ``t``'s runs one after the other from
    ``starts[t]``, in row order (:func:`tile_counts` gave the runs)."""
    for t in range(t0, t1):
        p = starts[t]
        for q in range(sel.shape[0]):
            k = pos[q, t]
            for i in range(counts[t, q]):
                out_data[p] = data[k + i]
                out_idx[p] = indices[k + i]
                p += 1


@nb.njit(cache=True, nogil=True)
def tile_fill_compact(data, indices, sel, counts, pos, starts, t0, t1, bounds, small, out_data, out_idx):
    """:func:`tile_fill` into the on-disk form: column indices as offsets in their tile
    (``out_idx`` uint16) and values in ``out_data``'s dtype (uint16 counts when ``small``).
    Returns False, the copy unfinished, at the first value a uint16 does not hold exactly."""
    for t in range(t0, t1):
        p = starts[t]
        j0 = bounds[t]
        for q in range(sel.shape[0]):
            k = pos[q, t]
            for i in range(counts[t, q]):
                v = data[k + i]
                if small and not (v >= 0 and v <= 65535 and v == np.floor(v)):
                    return False
                out_data[p] = v
                out_idx[p] = indices[k + i] - j0
                p += 1
    return True


@nb.njit(cache=True, nogil=True)
def row_totals(data, indptr, out, r0, r1):
    """Rows ``r0:r1``: their sums in float64 into ``out`` (index order; exact for integral counts
    below 2**53). Returns the position in ``data`` of the first value that is not a count
    (NaN, inf, negative or fractional), or -1."""
    bad = -1
    for i in range(r0, r1):
        s = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            v = float(data[k])
            if bad < 0 and not (v >= 0 and v == math.floor(v) and v < np.inf):
                bad = k
            s += v
        out[i] = s
    return bad


@nb.njit(cache=True, nogil=True)
def is_canonical(indices, indptr):
    """Whether every row's column indices are strictly increasing (sorted, no duplicates)."""
    for r in range(indptr.shape[0] - 1):
        for k in range(indptr[r] + 1, indptr[r + 1]):
            if indices[k] <= indices[k - 1]:
                return False
    return True


@nb.njit(cache=True, nogil=True)
def remap_columns(data, indices, indptr, col_map, n_cols, out_data, out_idx):
    """Entries with column ``col_map[j]`` for ``j``, each row sorted by its new columns.

    Two stable counting sorts (by new column, then by row) over the whole chunk: linear in its
    entries, whatever the permutation.
    """
    n_rows = indptr.shape[0] - 1
    nnz = indptr[n_rows]
    row_of = np.empty(nnz, np.int64)
    for r in range(n_rows):
        for k in range(indptr[r], indptr[r + 1]):
            row_of[k] = r
    start = np.zeros(n_cols + 1, np.int64)
    for k in range(nnz):
        start[col_map[indices[k]] + 1] += 1
    for c in range(n_cols):
        start[c + 1] += start[c]
    by_col = np.empty(nnz, np.int64)  # entry positions ordered by new column, then by row
    for k in range(nnz):
        c = col_map[indices[k]]
        by_col[start[c]] = k
        start[c] += 1
    pos = indptr[:n_rows].copy()
    for q in range(nnz):  # stable by row: each row's entries come out in new-column order
        k = by_col[q]
        r = row_of[k]
        out_data[pos[r]] = data[k]
        out_idx[pos[r]] = col_map[indices[k]]
        pos[r] += 1


@nb.njit(cache=True, nogil=True)
def row_bounds(indices, indptr, bounds, r0, r1, out):
    """``out[r, i]``: the first entry of row ``r`` (rows ``r0:r1``) whose column is >= ``bounds[i]``.

    One sequential walk per row: the blocks of genes of a tile then find each row's slice
    without a binary search (whose every step misses the cache on a large matrix)."""
    nb_ = bounds.shape[0]
    for r in range(r0, r1):
        k = indptr[r]
        end = indptr[r + 1]
        for i in range(nb_):
            b = bounds[i]
            while k < end and indices[k] < b:
                k += 1
            out[r, i] = k


@nb.njit(cache=True, nogil=True)
def dense_row_counts(block, indptr):
    """``indptr``: the row pointers of ``block`` (2-D, C order) as CSR, entries ``!= 0`` (NaN kept,
    ``-0.0`` dropped, as scipy converts a dense array)."""
    indptr[0] = 0
    for r in range(block.shape[0]):
        n = 0
        for j in range(block.shape[1]):
            n += block[r, j] != 0
        indptr[r + 1] = indptr[r] + n


@nb.njit(cache=True, nogil=True)
def dense_fill(block, indptr, data, indices):
    """The entries of ``block`` that are ``!= 0`` into ``data``/``indices``, row by row from ``indptr``."""
    for r in range(block.shape[0]):
        p = indptr[r]
        for j in range(block.shape[1]):
            v = block[r, j]
            if v != 0:
                data[p] = v
                indices[p] = j
                p += 1
