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

from vcell.eval._de_kernels import _MEAN_NONE, _gene_tests, _lower_bound, _work_arrays

#: Counts below this have their ``log1p(CPM)`` looked up per cell (:func:`log1p_table`): 99 % of
#: the non-zeros of ~20k-UMI cells; the rest are computed.
TABLE_COUNTS = 32


@nb.njit(cache=True, nogil=True, error_model="numpy")
def value(data, k, indices, colscale):
    """Stored value ``k`` as float64; with a column scale (the baseline: control cells scaled gene
    by gene), ``float32(float32(x) * scale[gene])`` as the baseline's emitted matrix holds it."""
    if colscale.shape[0] == 0:
        return float(data[k])
    return float(np.float32(float(np.float32(data[k])) * colscale[indices[k]]))


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _bounds(indices, indptr, row, j0, j1, rb, bi):
    """The slice of ``row`` holding genes ``j0:j1``: from ``rb`` when it has rows, else searched."""
    if rb.shape[0] > 0:
        return rb[row, bi], rb[row, bi + 1]
    s = _lower_bound(indices, indptr[row], indptr[row + 1], j0)
    return s, _lower_bound(indices, s, indptr[row + 1], j1)


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _count_rows(data, indices, indptr, rows, grp, j0, j1, keep, cnt, colscale, rb, bi, lo_r, hi_r):
    """Count the kept non-zeros of each visited row's slice into ``cnt[grp[q]]``; keep the slices."""
    tested = False
    for j in range(j0, j1):
        tested |= keep[j]
    for q in range(rows.shape[0]):
        s, e = _bounds(indices, indptr, rows[q], j0, j1, rb, bi)
        lo_r[q] = s
        hi_r[q] = e
        if not tested:  # nothing to count (a summary without tests)
            continue
        g = grp[q]
        for k in range(s, e):
            if keep[indices[k]] and value(data, k, indices, colscale) != 0:
                cnt[g, indices[k] - j0] += 1


@nb.njit(cache=True, nogil=True, error_model="numpy")
def log1p_table(rows, div):
    """``out[q, v] = log1p(v / div[rows[q]])`` for ``v < TABLE_COUNTS``: the values
    :func:`_gather_rows` would compute for small counts, computed once per visited row."""
    out = np.empty((rows.shape[0], TABLE_COUNTS), np.float64)
    for q in range(rows.shape[0]):
        d = div[rows[q]]
        for v in range(TABLE_COUNTS):
            out[q, v] = math.log1p(float(v) / d)
    return out


@nb.njit(cache=True, nogil=True, error_model="numpy")
def log1p_cpm(v, d, table, q):
    """``log1p(v / d)`` of the non-zero count ``v`` in visited row ``q`` (``d``: its library size /
    1e6): from its :func:`log1p_table` row when given (``table`` not empty) and ``v`` is a small
    count, else computed. Every kernel that tests ``log1p(CPM)`` values takes them from here,
    so equal counts give equal bits whichever path gathered them."""
    if table.shape[0] > 0 and v > 0 and v < TABLE_COUNTS and v == math.floor(v):
        return table[q, int(v)]
    return math.log1p(v / d)


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _gather_rows(data, indices, rows, grp, lo_r, hi_r, div, inv_n, j0, keep, raw_sums, cpm_sums, vals, cur, colscale, table):
    """Each visited row's slice: add it to its group's sums, gather ``log1p(CPM)`` of the kept
    genes into the (gene, group) regions; returns whether a NaN was seen. ``div``: each row's
    library size / 1e6; ``inv_n``: 1 / (cells in the group); ``table``: :func:`log1p_table` of
    ``rows`` (the same expression, so the same bits; empty: every value computed)."""
    nan_seen = False
    for q in range(rows.shape[0]):
        g = grp[q]
        d = div[rows[q]]
        w = inv_n[g]
        for k in range(lo_r[q], hi_r[q]):
            v = value(data, k, indices, colscale)
            if v != 0:
                nan_seen |= v != v
                j = indices[k]
                c = v / d
                raw_sums[g, j] += v
                cpm_sums[g, j] += c * w
                if keep[j]:
                    jl = j - j0
                    vals[cur[g, jl]] = log1p_cpm(v, d, table, q)
                    cur[g, jl] += 1
    return nan_seen


@nb.njit(cache=True, nogil=True, error_model="numpy")
def counts_chunk(
    data0, indices0, indptr0, div0, rows0, grp0, rb0,
    data1, indices1, indptr1, div1, rows1, grp1, rb1, bi,
    sizes, keep, j0, j1, stat, pval, raw_sums, cpm_sums, inv_n, colscale1, table0, table1,
):
    """Genes ``j0:j1``: pseudobulk sums, CPM sums and the tests of the kept genes.

    The cells of group ``grp0[q]`` (0: the control) are rows ``rows0[q]`` of CSR matrix 0; those
    of group ``grp1[q]`` (>= 1) rows ``rows1[q]`` of matrix 1 (sorted column indices; a row may
    come more than once). Each group's rows are visited in the order given, which is the order
    of its sums (callers list them group after group). ``div*`` hold each row's
    library size / 1e6 (CPM = count / div). ``raw_sums[g, j]`` accumulates the raw counts,
    ``cpm_sums[g, j]`` the CPM values times ``inv_n[g]`` (scipy's mean: sum in row order of
    ``x * (1 / n)``), both in float64; ``stat``/``pval[g - 1, j]`` are written for genes with
    ``keep[j]``. Matrix 1's values are scaled by ``colscale1`` when it is not empty
    (:func:`value`). ``rb*[row, bi]``, ``rb*[row, bi + 1]`` bound the rows' slices when given;
    ``table*`` are the rows' :func:`log1p_table` (or empty). Returns whether a NaN was seen.
    """
    n_g1 = sizes.shape[0]
    cl = j1 - j0
    lo0, hi0 = np.empty(rows0.shape[0], np.int64), np.empty(rows0.shape[0], np.int64)
    lo1, hi1 = np.empty(rows1.shape[0], np.int64), np.empty(rows1.shape[0], np.int64)
    cnt = np.zeros((n_g1, cl), np.int64)  # (group, gene): a group's cells write along one row
    no_scale = np.empty(0, np.float64)  # made here: a global array is typed read-only, another compilation of each helper
    # the two matrices may differ in dtype: one helper, compiled for each
    _count_rows(data0, indices0, indptr0, rows0, grp0, j0, j1, keep, cnt, no_scale, rb0, bi, lo0, hi0)
    _count_rows(data1, indices1, indptr1, rows1, grp1, j0, j1, keep, cnt, colscale1, rb1, bi, lo1, hi1)
    gene_ptr = np.zeros(cl + 1, np.int64)
    cur = np.empty((n_g1, cl), np.int64)  # next free slot of each (gene, group) region
    for jl in range(cl):
        acc = gene_ptr[jl]
        for q in range(n_g1):
            cur[q, jl] = acc
            acc += cnt[q, jl]
        gene_ptr[jl + 1] = acc
    vals = np.empty(gene_ptr[cl], np.float64)
    nan_seen = _gather_rows(data0, indices0, rows0, grp0, lo0, hi0, div0, inv_n, j0, keep, raw_sums, cpm_sums, vals, cur, no_scale, table0)
    nan_seen |= _gather_rows(data1, indices1, rows1, grp1, lo1, hi1, div1, inv_n, j0, keep, raw_sums, cpm_sums, vals, cur, colscale1, table1)
    accs = np.empty(n_g1, np.float64)
    scale = np.ones(n_g1, np.float64)
    means = np.empty((n_g1, 1), np.float64)  # the log-space means of _gene_tests: not needed here
    lsums = np.empty((n_g1, 1), np.float64)
    work, fwork = _work_arrays(rows0.shape[0] + rows1.shape[0], vals)
    gstart = np.empty(n_g1, np.int64)
    gcnt = np.empty(n_g1, np.int64)
    sid = np.int64(0)
    for jl in range(cl):
        if not keep[j0 + jl]:
            continue
        acc = gene_ptr[jl]
        for q in range(n_g1):
            gstart[q] = acc
            gcnt[q] = cnt[q, jl]
            acc += gcnt[q]
        sid = _gene_tests_at(vals, gstart, gcnt, sizes, scale, j0 + jl, stat, pval, means, lsums, accs, work, fwork, sid)
    return nan_seen


@nb.njit(cache=True, error_model="numpy")
def _gene_tests_at(vals, gstart, cnt, sizes, scale, j, stat, pval, means, lsums, accs, work, fwork, sid):
    """:func:`_gene_tests` for gene ``j``, without its log-space means (not needed here)."""
    sid = _gene_tests(vals, gstart, cnt, sizes, scale, _MEAN_NONE, 0, stat[:, j:j + 1], pval[:, j:j + 1], means, lsums, accs, work, fwork, sid)
    return sid


@nb.njit(cache=True, nogil=True, error_model="numpy")
def mean_counts(data, indices, indptr, rows, grp, inv_n, j0, j1, out, rb, bi):
    """Genes ``j0:j1``: ``out[g, j]`` += ``float64(x) * inv_n[g]`` over the rows ``rows`` of group
    ``grp`` in the order given: scipy's mean of the rows of a CSR matrix (rows increasing per group)."""
    for q in range(rows.shape[0]):
        g = grp[q]
        w = inv_n[g]
        s, e = _bounds(indices, indptr, rows[q], j0, j1, rb, bi)
        for k in range(s, e):
            out[g, indices[k]] += float(data[k]) * w


@nb.njit(cache=True, nogil=True, error_model="numpy")
def scaled_totals(data, indices, indptr, rows, colscale, j0, j1, acc, rb, bi):
    """Genes ``j0:j1`` of rows ``rows``: ``acc[q]`` += each scaled value (:func:`value`) in
    column order. Called tile after tile in gene order, this is each scaled row's sum in index
    order, as :func:`row_totals` sums the baseline's emitted rows."""
    for q in range(rows.shape[0]):
        row = rows[q]
        s, e = _bounds(indices, indptr, row, j0, j1, rb, bi)
        t = acc[q]
        for k in range(s, e):
            t += value(data, k, indices, colscale)
        acc[q] = t


@nb.njit(cache=True, nogil=True, error_model="numpy")
def row_stats(data, indices, indptr, gid, sums, totals, r0, r1):
    """Rows ``r0:r1`` of a CSR chunk: each row's sum (float64, index order) into ``totals`` and,
    when ``sums`` has rows, ``sums[gid[r], j]`` += its values (rows with ``gid < 0`` skipped).
    Returns the position in ``data`` of the first value that is not a count (NaN, inf, negative
    or fractional), or -1: :func:`~vcell.eval._band_kernels.row_totals` and :func:`group_sums` in
    one pass."""
    bad = -1
    grouped = sums.shape[0] > 0
    for i in range(r0, r1):
        g = gid[i] if grouped else -1
        s = 0.0
        ok = True
        for k in range(indptr[i], indptr[i + 1]):
            v = float(data[k])
            s += v
            ok &= (v >= 0.0) & (v == math.floor(v)) & (v - v == 0.0)
            if g >= 0:
                sums[g, indices[k]] += v
        totals[i] = s
        if not ok and bad < 0:
            for k in range(indptr[i], indptr[i + 1]):
                v = float(data[k])
                if not (v >= 0.0 and v == math.floor(v) and v - v == 0.0):
                    bad = k
                    break
    return bad


@nb.njit(cache=True, nogil=True, error_model="numpy")
def scaled_sums(data, indices, indptr, rows, grp, colscale, j0, j1, out):
    """Genes ``j0:j1``: ``out[grp[q], j]`` += each scaled value (:func:`value`) of row ``rows[q]``,
    rows in the order given: the pseudobulks :func:`counts_chunk` sums for these rows."""
    for q in range(rows.shape[0]):
        g = grp[q]
        row = rows[q]
        s = _lower_bound(indices, indptr[row], indptr[row + 1], j0)
        e = _lower_bound(indices, s, indptr[row + 1], j1)
        for k in range(s, e):
            out[g, indices[k]] += value(data, k, indices, colscale)
