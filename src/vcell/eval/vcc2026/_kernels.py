"""numba kernels of the VCC 2026 evaluator: per-group sums and the Wilcoxon tests on raw counts.

:func:`counts_chunk` processes one block of genes of raw counts stored as CSR. Per (group,
gene) it sums the raw counts (the pseudobulk) and the CPM values (the means of the fold
changes), and it runs the Mann-Whitney U test of every group against group 0 (the control) on
``log1p(CPM)``, the values cell-eval2 hands to pdex, transformed as they are gathered: no
normalised copy of the matrix is ever made. The control's rows may come from another matrix
than the perturbations' (the reference's controls for a prediction). The test itself is the
2025 engine's (:func:`vcell.eval._de_kernels._gene_tests`), exact to the last bit of pdex.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from vcell.eval._de_kernels import _gene_tests, _lower_bound, _work_arrays


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _count_slice(data, indices, indptr, row, j0, j1, keep, cnt, g):
    """The slice of ``row`` holding genes ``j0:j1``; counts its kept non-zeros into ``cnt[:, g]``."""
    s = _lower_bound(indices, indptr[row], indptr[row + 1], j0)
    e = _lower_bound(indices, s, indptr[row + 1], j1)
    for k in range(s, e):
        if data[k] != 0 and keep[indices[k]]:
            cnt[indices[k] - j0, g] += 1
    return s, e


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _gather_slice(data, indices, lo, hi, d, w, g, j0, keep, raw_sums, cpm_sums, vals, pos):
    """Entries ``lo:hi`` of one row of group ``g``: add them to the sums, gather ``log1p(CPM)`` of
    the kept genes; returns whether a NaN was seen. ``d``: the row's library size / 1e6;
    ``w``: 1 / (cells in the group)."""
    nan_seen = False
    for k in range(lo, hi):
        v = float(data[k])
        if v != 0:
            nan_seen |= v != v
            j = indices[k]
            c = v / d
            raw_sums[g, j] += v
            cpm_sums[g, j] += c * w
            if keep[j]:
                jl = j - j0
                vals[pos[jl]] = math.log1p(c)
                pos[jl] += 1
    return nan_seen


@nb.njit(cache=True, nogil=True, error_model="numpy")
def counts_chunk(
    data0, indices0, indptr0, div0, data1, indices1, indptr1, div1,
    order, gptr, sizes, keep, j0, j1, stat, pval, raw_sums, cpm_sums, inv_n,
):
    """Genes ``j0:j1``: pseudobulk sums, CPM sums and the tests of the kept genes.

    Group 0 (the control) is rows ``order[:gptr[1]]`` of CSR matrix 0, every other group
    ``g`` rows ``order[gptr[g]:gptr[g + 1]]`` of matrix 1 (sorted column indices). ``div*``
    hold each row's library size / 1e6 (CPM = count / div). ``raw_sums[g, j]`` accumulates the
    raw counts, ``cpm_sums[g, j]`` the CPM values times ``inv_n[g]`` (scipy's mean: sum in row
    order of ``x * (1 / n)``), both in float64; ``stat``/``pval[g - 1, j]`` are written for
    genes with ``keep[j]``. Returns whether a NaN was seen.
    """
    n_rows = order.shape[0]
    n_g1 = sizes.shape[0]
    n_ctrl = gptr[1]
    cl = j1 - j0
    lo_r = np.empty(n_rows, np.int64)
    hi_r = np.empty(n_rows, np.int64)
    cnt = np.zeros((cl, n_g1), np.int64)
    g = 0
    for r in range(n_rows):  # pass 1: this block's slice of every row, kept non-zeros per gene/group
        while r >= gptr[g + 1]:
            g += 1
        row = order[r]
        if r < n_ctrl:  # the two matrices may differ in dtype: one helper, compiled for each
            s, e = _count_slice(data0, indices0, indptr0, row, j0, j1, keep, cnt, g)
        else:
            s, e = _count_slice(data1, indices1, indptr1, row, j0, j1, keep, cnt, g)
        lo_r[r] = s
        hi_r[r] = e
    gene_ptr = np.zeros(cl + 1, np.int64)
    for jl in range(cl):
        gene_ptr[jl + 1] = gene_ptr[jl] + cnt[jl].sum()
    vals = np.empty(gene_ptr[cl], np.float64)
    pos = gene_ptr[:cl].copy()
    nan_seen = False
    g = 0
    for r in range(n_rows):  # pass 2: sums, and gather log1p(CPM) (rows are in group order)
        while r >= gptr[g + 1]:
            g += 1
        row = order[r]
        if r < n_ctrl:
            nan_seen |= _gather_slice(data0, indices0, lo_r[r], hi_r[r], div0[row], inv_n[g], g, j0, keep, raw_sums, cpm_sums, vals, pos)
        else:
            nan_seen |= _gather_slice(data1, indices1, lo_r[r], hi_r[r], div1[row], inv_n[g], g, j0, keep, raw_sums, cpm_sums, vals, pos)
    accs = np.empty(n_g1, np.float64)
    scale = np.ones(n_g1, np.float64)
    means = np.empty((n_g1, 1), np.float64)  # the log-space means of _gene_tests: not needed here
    lsums = np.empty((n_g1, 1), np.float64)
    work, fwork = _work_arrays(n_rows, vals)
    gstart = np.empty(n_g1, np.int64)
    sid = 0
    for jl in range(cl):
        if not keep[j0 + jl]:
            continue
        acc = gene_ptr[jl]
        for q in range(n_g1):
            gstart[q] = acc
            acc += cnt[jl, q]
        sid = _gene_tests_at(vals, gstart, cnt[jl], sizes, scale, j0 + jl, stat, pval, means, lsums, accs, work, fwork, sid)
    return nan_seen


@nb.njit(cache=True, error_model="numpy")
def _gene_tests_at(vals, gstart, cnt, sizes, scale, j, stat, pval, means, lsums, accs, work, fwork, sid):
    """:func:`_gene_tests` for gene ``j``, its (unused) means written to column 0 of scratch arrays."""
    sid = _gene_tests(vals, gstart, cnt, sizes, scale, 0, 0, stat[:, j:j + 1], pval[:, j:j + 1], means, lsums, accs, work, fwork, sid)
    return sid


@nb.njit(cache=True, nogil=True, error_model="numpy")
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
