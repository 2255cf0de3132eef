"""numba kernels of the replicate anchor: every half of every split summarised and tested in one pass.

Each split of the anchor gives every cell of the reference to half A, half B or neither, and
each half is summarised (summed counts, mean CPM) and its perturbations tested against that
half's own controls. Done half by half, every value is read, gathered and looked up once per
split. Here each value is read once for all the splits: :func:`split_sums_chunk` adds it to the
sums of the halves its cell belongs to (row after row, so each half's sums are added in the
order its own pass adds them); :func:`split_tests_chunk` gathers each (gene, group)'s
``log1p(CPM)`` values once, sorts a gene's control values once, finds each value's place among
them once, and counts every half's U statistic and tie term from that place: the number of a
half's control values below a place is a prefix count over the sorted controls
(``below[place, half]``). U (in half units) and the tie term are integers, so every half's
p-value is the float its own test gives (:func:`vcell.eval._de_kernels._gene_tests`), bit for
bit, and so are its sums.

Values are the reference's raw counts: non-negative, so every gathered value is positive.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from vcell.eval._de_kernels import _lower_bound, _mwu_from_u, _place, _sort_control, _sort_range
from vcell.eval.vcc2026._kernels import _bounds, log1p_cpm

#: A half's 2U and its count of non-zero values are added together, packed in one int64: 2U in the
#: low 40 bits (2 n1 n2 < 2^40 for halves of up to ~700,000 cells), the count above.
_COUNT_SHIFT = 40
_COUNT_UNIT = 1 << _COUNT_SHIFT
_U_MASK = _COUNT_UNIT - 1
#: Values the tests gather at a time (float64 + int32 row each): a thread's working memory.
_RANGE_VALUES = 4_000_000


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _gather(data, indices, rows, grp, lo_r, hi_r, div, j0, keep, vals, ids, cur, table):
    """Each visited row's kept non-zeros as ``log1p(CPM)``
    (:func:`~vcell.eval.vcc2026._kernels.log1p_cpm`) into the (gene, group) regions of ``vals``,
    the row into ``ids``."""
    for q in range(rows.shape[0]):
        g = grp[q]
        d = div[rows[q]]
        for k in range(lo_r[q], hi_r[q]):
            v = float(data[k])
            j = indices[k]
            if v != 0 and keep[j]:
                jl = j - j0
                vals[cur[g, jl]] = log1p_cpm(v, d, table, q)
                ids[cur[g, jl]] = rows[q]
                cur[g, jl] += 1


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _gene(vals, ids, gstart, cnt, codes, n_half, keep, j, jl, pval, iw, fw, below, step, mult, hw, sid):
    """Every half's tests of gene ``j`` (``jl`` in the block): ``pval[h, g - 1, j]`` for the halves
    ``h`` keeping it; returns the next free stamp id. ``codes[row, s]``: the row's half in split
    ``s`` (0: A, 1: B, -1: none); half ``h`` is ``2 s + code``. ``n_half[g]``: the cells of group
    ``g`` in each half. ``iw``, ``fw``, ``below``, ``step``, ``mult``, ``hw``: :func:`work_arrays`."""
    n_splits = codes.shape[1]
    n_h = 2 * n_splits
    n_g1 = n_half.shape[0]
    table, cursor, run_end = iw[0], iw[1], iw[2]
    stamp_e, stamp_g, first_g, over_id = iw[3], iw[4], iw[5], iw[6]
    cs, over, tmp = fw[0], fw[1], fw[2]
    ctie, cz, acc, dtie = hw[0], hw[1], hw[2], hw[3]
    k0 = cnt[0, jl]
    c0 = gstart[0, jl]
    _, vmin, tscale, n_buckets = _sort_control(vals, c0, k0, cs, table, cursor)  # no negative counts
    # below[p, h]: half h's controls among cs[:p], for p at the start of a run of equal values
    # (the only places a lookup returns) and at k0: each control counted at its run's start
    for p in range(k0 + 1):
        for h in range(n_h):
            below[p, h] = 0
    for i in range(c0, c0 + k0):
        p = _place(cs, table, vals[i], vmin, tscale, n_buckets)
        for s in range(n_splits):
            c = codes[ids[i], s]
            if c >= 0:
                below[p + 1, 2 * s + c] += 1
    for p in range(k0):
        for h in range(n_h):
            below[p + 1, h] += below[p, h]
    for h in range(n_h):
        ctie[h] = 0
    i = 0
    while i < k0:
        e = i + 1
        while e < k0 and cs[e] == cs[i]:
            e += 1
        for q in range(i, e):
            run_end[q] = e
        if e - i > 1:
            for h in range(n_h):
                b = below[e, h] - below[i, h]
                ctie[h] += b * b * b - b
        i = e
    for h in range(n_h):
        cz[h] = n_half[0] - below[k0, h]
    for p in range(k0 + 1):  # what a value at place p adds to a half's count and 2U, packed
        for h in range(n_h):
            step[p, h] = 2 * (below[p, h] + cz[h]) + _COUNT_UNIT
    n2 = float(n_half[0])
    for g in range(1, n_g1):
        for h in range(n_h):
            acc[h] = 0
            dtie[h] = 0
        sid += 1
        n_over = np.int64(0)
        for i in range(gstart[g, jl], gstart[g, jl] + cnt[g, jl]):
            x = vals[i]
            r = ids[i]
            lo = _place(cs, table, x, vmin, tscale, n_buckets)
            if lo < k0 and cs[lo] == x:  # x is a control value: it ties with that run's cells
                e = run_end[lo]
                if stamp_e[lo] != sid:  # the group's first cell at this value (rare for counts)
                    stamp_e[lo] = sid
                    for h in range(n_h):
                        mult[lo, h] = 0
                for s in range(n_splits):
                    c = codes[r, s]
                    if c >= 0:
                        h = 2 * s + c
                        b = below[e, h] - below[lo, h]
                        acc[h] += step[lo, h] + b
                        t = mult[lo, h] + b  # joins b control cells and the group's earlier ones
                        dtie[h] += 3 * t * (t + 1)
                        mult[lo, h] += 1
                continue
            for s in range(n_splits):  # in the gap just below cs[lo]
                c = codes[r, s]
                if c >= 0:
                    acc[2 * s + c] += step[lo, 2 * s + c]
            if stamp_g[lo] != sid:  # ties in a gap only with the group's own values there
                stamp_g[lo] = sid
                first_g[lo] = i
            else:  # a gap shared by several values (a few per group for counts): counted below
                if first_g[lo] >= 0:
                    over[n_over] = vals[first_g[lo]]
                    over_id[n_over] = ids[first_g[lo]]
                    n_over += 1
                    first_g[lo] = -1
                over[n_over] = x
                over_id[n_over] = r
                n_over += 1
        if n_over > 1:
            _over_ties(over, over_id, n_over, codes, dtie, tmp)
        for h in range(n_h):
            if not keep[h, j]:
                continue
            z1 = n_half[g] - (acc[h] >> _COUNT_SHIFT)
            nz = float(z1 + cz[h])
            tie = (nz * nz * nz - nz) + float(ctie[h] + dtie[h])
            _, p = _mwu_from_u(0.5 * ((acc[h] & _U_MASK) + z1 * cz[h]), float(n_half[g]), n2, tie)
            pval[h, g - 1, j] = p
    return sid


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _over_ties(over, over_id, n, codes, dtie, tmp):
    """Ties among the values ``over[:n]`` (rows ``over_id``), those that shared a gap between
    control values with another: each half's sum(m^3 - m) over the distinct values (``m``: the
    half's cells holding it). A sorted copy (``tmp``) finds the repeated values; each is then
    counted per half over the list (repeats are rare for counts)."""
    for i in range(n):
        tmp[i] = over[i]
    _sort_range(tmp, np.int64(0), n)
    n_splits = codes.shape[1]
    i = 0
    while i < n:
        e = i + 1
        while e < n and tmp[e] == tmp[i]:
            e += 1
        if e - i > 1:
            for s in range(n_splits):
                m0 = 0
                m1 = 0
                for q in range(n):
                    if over[q] == tmp[i]:
                        c = codes[over_id[q], s]
                        m0 += c == 0
                        m1 += c == 1
                dtie[2 * s] += m0 * m0 * m0 - m0
                dtie[2 * s + 1] += m1 * m1 * m1 - m1
        i = e


@nb.njit(cache=True, nogil=True, error_model="numpy")
def work_arrays(n_values, n_halves):
    """Work arrays of :func:`_gene` for at most ``n_values`` values of a (gene, group)."""
    size = 2 * n_values + 2
    iw = np.empty((7, size), np.int64)
    iw[3, :] = -1  # stamps
    iw[4, :] = -1
    fw = np.empty((3, size), np.float64)
    below = np.empty((n_values + 1, n_halves), np.int64)
    step = np.empty((n_values + 1, n_halves), np.int64)
    mult = np.empty((n_values + 1, n_halves), np.int64)
    hw = np.empty((4, n_halves), np.int64)
    return iw, fw, below, step, mult, hw


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _half_sums(data, indices, rows, grp, lo_r, hi_r, div, inv_n, codes, raw, cpm, q0, q1, cnt, j0):
    """Visits ``q0:q1``: each value added to the sums of its row's halves, ``raw[h, g, j]`` (the
    count) and ``cpm[h, g, j]`` (CPM times ``inv_n[g]``): a half's rows in row order, as its own
    :func:`~vcell.eval.vcc2026._kernels.counts_chunk` sums them; ``cnt[g, j - j0]`` counts the
    non-zeros. Returns whether a NaN was seen."""
    n_splits = codes.shape[1]
    hs = np.empty(n_splits, np.int64)
    nan_seen = False
    for q in range(q0, q1):
        g = grp[q]
        r = rows[q]
        d = div[r]
        w = inv_n[g]
        n_in = 0
        for s in range(n_splits):
            if codes[r, s] >= 0:
                hs[n_in] = 2 * s + codes[r, s]
                n_in += 1
        for k in range(lo_r[q], hi_r[q]):
            v = float(data[k])
            if v != 0:
                nan_seen |= v != v
                j = indices[k]
                cnt[g, j - j0] += 1
                c = v / d
                for t in range(n_in):
                    raw[hs[t], g, j] += v
                    cpm[hs[t], g, j] += c * w
    return nan_seen


@nb.njit(cache=True, nogil=True, error_model="numpy")
def split_sums_chunk(data, indices, indptr, div, rows, grp, rb, bi, codes, inv_n, min_cpm, j0, j1, raw, cpm, keep, lo, hi, cnt):
    """Genes ``j0:j1`` of every half of every split: sums, mean CPM and tested genes.

    Group 0 (the control) and the groups ``g >= 1`` are rows ``rows[q]`` (group ``grp[q]``,
    group after group, each in row order) of the CSR matrix (sorted column indices); ``div``
    holds each row's library size / 1e6; ``codes[row, s]`` the row's half in split ``s`` (0: A,
    1: B, -1: none), half ``h = 2 s + code``; ``inv_n[g]``: 1 / the cells of group ``g`` in each
    half. Writes ``raw[h, g, j]`` (summed counts), ``cpm[h, g, j]`` (mean CPM), ``keep[h, j]``
    (the half's control mean CPM above ``min_cpm``), each visited row's slice of the genes,
    ``lo[q]:hi[q]``, and ``cnt[g, j - j0]``: the non-zeros of group ``g`` (all its cells) in gene
    ``j``. ``rb[row, bi]``, ``rb[row, bi + 1]`` bound the rows' slices when given. Returns
    whether a NaN was seen.
    """
    n_ctrl = np.int64(0)
    for q in range(rows.shape[0]):
        lo[q], hi[q] = _bounds(indices, indptr, rows[q], j0, j1, rb, bi)
        n_ctrl += grp[q] == 0
    nan_seen = _half_sums(data, indices, rows, grp, lo, hi, div, inv_n, codes, raw, cpm, np.int64(0), n_ctrl, cnt, j0)
    for h in range(keep.shape[0]):
        for j in range(j0, j1):
            keep[h, j] = cpm[h, 0, j] > min_cpm
    nan_seen |= _half_sums(data, indices, rows, grp, lo, hi, div, inv_n, codes, raw, cpm, n_ctrl, np.int64(rows.shape[0]), cnt, j0)
    return nan_seen


@nb.njit(cache=True, nogil=True, error_model="numpy")
def split_tests_chunk(data, indices, rows, grp, lo, hi, div, table, codes, n_half, keep, j0, j1, pval, counts):
    """Genes ``j0:j1`` of every half of every split: the tests (``pval[h, g - 1, j]`` where
    ``keep[h, j]``), after :func:`split_sums_chunk` (the rows' slices ``lo:hi``, which this moves,
    and the groups' non-zeros per gene ``counts``).
    ``table``: the visited rows' :func:`~vcell.eval.vcc2026._kernels.log1p_table`;
    ``n_half[g]``: the cells of group ``g`` in each half. Gene range after gene range, each
    (gene, group)'s values gathered once (about :data:`_RANGE_VALUES` at a time), then
    :func:`_gene`."""
    n_g1 = n_half.shape[0]
    keep_any = np.zeros(j1, np.bool_)  # indexed by gene: j0:j1 set
    for h in range(keep.shape[0]):
        for j in range(j0, j1):
            keep_any[j] |= keep[h, j]
    ends = hi.copy()
    n_vals = np.int64(0)
    for q in range(rows.shape[0]):
        n_vals += hi[q] - lo[q]
    n_ranges = max(np.int64(1), min(np.int64(j1 - j0), (n_vals + _RANGE_VALUES - 1) // _RANGE_VALUES))
    a = j0
    for r in range(n_ranges):
        b = j0 + ((j1 - j0) * (r + 1)) // n_ranges
        for q in range(rows.shape[0]):  # each row's slice of genes a:b
            hi[q] = _lower_bound(indices, lo[q], ends[q], b)
        cl = b - a
        cnt = np.zeros((n_g1, cl), np.int64)  # the kept genes' non-zeros, counted by the sums
        for jl in range(cl):
            if keep_any[a + jl]:
                for g in range(n_g1):
                    cnt[g, jl] = counts[g, a - j0 + jl]
        gstart = np.empty((n_g1, cl), np.int64)
        cur = np.empty((n_g1, cl), np.int64)
        acc = 0
        most = np.int64(1)
        for jl in range(cl):
            for g in range(n_g1):
                gstart[g, jl] = acc
                cur[g, jl] = acc
                acc += cnt[g, jl]
                most = max(most, cnt[g, jl])
        vals = np.empty(acc, np.float64)
        ids = np.empty(acc, np.int32)
        _gather(data, indices, rows, grp, lo, hi, div, a, keep_any, vals, ids, cur, table)
        iw, fw, below, step, mult, hw = work_arrays(most, 2 * codes.shape[1])
        sid = np.int64(0)
        for jl in range(cl):
            if keep_any[a + jl]:
                sid = _gene(vals, ids, gstart, cnt, codes, n_half, keep, a + jl, jl, pval, iw, fw, below, step, mult, hw, sid)
        for q in range(rows.shape[0]):
            lo[q] = hi[q]
        a = b
