"""The numba kernels of the DE engine (:mod:`vcell.eval.de`): Mann-Whitney U per gene and group.

:func:`_dense_chunk` and :func:`_csr_chunk` process one block of genes of a dense or CSR matrix
(gather each gene's non-zeros per group, then :func:`_gene_tests`); they release the GIL, so
:mod:`vcell.eval.de` runs blocks on several Python threads. :func:`_expm1` and
:func:`_fold_changes` turn the log-space means into cell-eval's fold changes. The algorithm and
its exactness guarantees are described in :mod:`vcell.eval.de`.

A literal ``0`` passed to another kernel (or a counter started at ``0`` and passed on) makes
numba compile that kernel a second time for ``Literal[int](0)``; such arguments are written
``np.int64(0)``, which cut the first (cold) run's compilation by about a third.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

_MEAN_DENSE = 0  # numpy: (sum in row order) / n
_MEAN_SPARSE = 1  # scipy CSR: sum in row order of x * (1 / n)
_MEAN_NONE = 2  # no means nor sums (the caller summed the values itself)


@nb.njit(cache=True, error_model="numpy")
def _lower_bound(a, lo, hi, v):
    """First index in ``a[lo:hi]`` (sorted) whose value is >= ``v``."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(cache=True, error_model="numpy")
def _sort_range(a, lo, hi):
    """Sort ``a[lo:hi]`` in place: insertion sort when short or already sorted, else heapsort.

    (Our own small sort: it is only used on short or rare ranges, and compiles much faster than
    numba's generic quicksort.)
    """
    n = hi - lo
    if n < 2:
        return
    ordered = True
    for i in range(lo + 1, hi):
        if a[i] < a[i - 1]:
            ordered = False
            break
    if ordered:
        return
    if n <= 24:
        for i in range(lo + 1, hi):
            v = a[i]
            q = i - 1
            while q >= lo and a[q] > v:
                a[q + 1] = a[q]
                q -= 1
            a[q + 1] = v
        return
    for start in range(n // 2 - 1, -1, -1):  # heapify (max-heap on a[lo:hi])
        _sift_down(a, lo, start, n)
    for end in range(n - 1, 0, -1):
        v = a[lo]
        a[lo] = a[lo + end]
        a[lo + end] = v
        _sift_down(a, lo, np.int64(0), end)


@nb.njit(cache=True, error_model="numpy")
def _sift_down(a, lo, root, n):
    v = a[lo + root]
    while True:
        child = 2 * root + 1
        if child >= n:
            break
        if child + 1 < n and a[lo + child + 1] > a[lo + child]:
            child += 1
        if a[lo + child] > v:
            a[lo + root] = a[lo + child]
            root = child
        else:
            break
    a[lo + root] = v


@nb.njit(cache=True, error_model="numpy")
def _mwu_from_u(u1, n1, n2, tie):
    """Two-sided asymptotic U test from U of sample 1 and sum(t^3 - t) over the pooled ties.

    Same floating-point expression as pdex / numba-mwu (so p is bit-identical); the
    continuity correction is 0.5. Zero variance (every value equal) gives p = 1.
    """
    n = n1 + n2
    u2 = n1 * n2 - u1
    mu = n1 * n2 / 2.0
    var_inner = (n + 1.0) - tie / (n * (n - 1.0))
    s_sq = n1 * n2 / 12.0 * var_inner
    if s_sq <= 0.0:
        return u1, 1.0
    s = math.sqrt(s_sq)
    u = u1 if u1 > u2 else u2
    z = ((u - mu) - 0.5) / s
    p = 0.5 * math.erfc(z / math.sqrt(2.0)) * 2.0
    if p > 1.0:
        p = 1.0
    if p < 0.0:
        p = 0.0
    return u1, p


@nb.njit(cache=True, error_model="numpy")
def _bucket(v, vmin, tscale, n_buckets):
    """Bucket of a positive value: monotone non-decreasing in ``v``, in ``[0, n_buckets)``."""
    if n_buckets == 1:
        return 0
    f = (v - vmin) * tscale
    if not f > 0.0:  # also NaN
        return 0
    if f >= n_buckets:
        return n_buckets - 1
    return int(f)


@nb.njit(cache=True, error_model="numpy")
def _sort_control(src, start, k0, cs, table, cursor):
    """Sort the control non-zeros ``src[start:start + k0]`` into ``cs[:k0]``.

    Negative values are sorted directly; positive values by a bucket sort (linear in the value,
    about one bucket per value) that also leaves ``table[b]`` = index in ``cs`` of the first value
    of bucket ``b`` (``table[n_buckets] = k0``), the lookup table of :func:`_gene_tests`.
    Returns ``(cneg, vmin, tscale, n_buckets)``.
    """
    cneg = np.int64(0)
    vmin = np.inf
    vmax = -np.inf
    for i in range(k0):
        v = src[start + i]
        if v < 0:
            cs[cneg] = v
            cneg += 1
        else:
            fv = float(v)
            if fv < vmin:
                vmin = fv
            if fv > vmax:
                vmax = fv
    _sort_range(cs, np.int64(0), cneg)
    npos = k0 - cneg
    n_buckets = 1
    tscale = 0.0
    if npos > 1 and vmax > vmin:
        n_buckets = min(2 * npos, table.shape[0] - 1)
        tscale = n_buckets / (vmax - vmin)
        if not (tscale > 0.0 and tscale < np.inf):
            n_buckets = 1
            tscale = 0.0
    for b in range(n_buckets):
        cursor[b] = 0
    for i in range(k0):
        v = src[start + i]
        if v > 0:
            cursor[_bucket(v, vmin, tscale, n_buckets)] += 1
    acc = cneg
    for b in range(n_buckets):
        table[b] = acc
        acc += cursor[b]
        cursor[b] = table[b]
    table[n_buckets] = acc
    for i in range(k0):
        v = src[start + i]
        if v > 0:
            b = _bucket(v, vmin, tscale, n_buckets)
            cs[cursor[b]] = v
            cursor[b] += 1
    for b in range(n_buckets):
        if table[b + 1] - table[b] > 1:
            _sort_range(cs, table[b], table[b + 1])
    cs[k0] = np.inf  # sentinel for the lookups
    return cneg, vmin, tscale, n_buckets


@nb.njit(cache=True, error_model="numpy")
def _place(cs, table, x, vmin, tscale, n_buckets):
    """First index of ``cs`` (sorted by :func:`_sort_control`, with its ``table``) whose value is >= ``x`` (> 0)."""
    bk = _bucket(x, vmin, tscale, n_buckets)
    lo, hi = table[bk], table[bk + 1]
    if hi - lo > 8:
        return _lower_bound(cs, lo, hi, x)
    lo += cs[lo] < x  # two steps without a branch: a bucket holds about one value
    lo += cs[lo] < x
    while cs[lo] < x:  # cs[hi:] >= x and cs[k0] = inf: no bound check
        lo += 1
    return lo


@nb.njit(cache=True, error_model="numpy")
def _slot(v, mask):
    """A hash of the value ``v`` in ``[0, mask]`` (``mask``: a power of 2 minus 1)."""
    if math.isinf(v):  # frexp's mantissa is inf: no integer to convert it to
        return 0
    m, e = math.frexp(float(v))
    bits = np.int64(m * 9007199254740992.0) * np.int64(-7046029254386353131) + np.int64(e)
    return (bits >> 17) & mask


@nb.njit(cache=True, error_model="numpy")
def _distinct_ties(x, n, count, key, used):
    """sum(a^3 - a) over the distinct values of ``x[:n]`` (``a``: how often each occurs).

    Counted in an open-addressing hash table (``key``/``count``, as many slots as ``count``
    holds, more than ``n``; ``count`` all 0 before and after; ``used`` has room for ``n`` slot
    numbers): linear in ``n`` where a sort is ``n log n``, and the same integer. Values are
    equal as floats; a NaN is distinct from every value, as in a sort.
    """
    size = 1
    while size < 2 * n:
        size *= 2
    while size > count.shape[0]:
        size //= 2
    mask = size - 1
    n_used = 0
    for i in range(n):
        v = x[i]
        if v != v:
            continue
        h = _slot(v, mask)
        while count[h] != 0 and not key[h] == v:
            h = (h + 1) & mask
        if count[h] == 0:
            key[h] = v
            used[n_used] = h
            n_used += 1
        count[h] += 1
    tie = 0
    for u in range(n_used):
        a = count[used[u]]
        tie += a * a * a - a
        count[used[u]] = 0
    return tie


@nb.njit(cache=True, error_model="numpy")
def _gene_tests(vals, gstart, cnt, sizes, scale, mean_mode, j, stat, pval, means, sums, accs, work, fwork, sid):
    """All groups of one gene; returns the next free stamp id.

    ``vals[gstart[g]:gstart[g] + cnt[g]]`` holds the non-zero values of the gene in group ``g``
    (``sizes[g]`` cells; 0 is the control) in row order. Writes ``means[g, j]`` (log-space
    means), ``sums[g, j]`` (float64 sums), ``stat[g - 1, j]`` and ``pval[g - 1, j]``. ``work``
    (int64) and ``fwork`` (values) are per-thread work arrays.

    U of a group is counted directly, U = sum over its cells x of #(control < x) +
    #(control == x) / 2 (in half units, exact): #(control < x) from the sorted control values
    through the bucket table (O(1) expected), #(control == x) from the control's runs of equal
    values. The tie term of the pooled sample grows by 3t(t + 1) each time a cell joins a value
    already held by t pooled cells; values are matched by their control position (a stamped
    table, no sort), and the distinct values sharing a gap are counted in a hash table at the end
    (:func:`_distinct_ties`). Those are common when a dense prediction faces sparse controls
    (more than half the values of a tie-free one), where sorting them took half of a test's time.
    """
    n_g1 = sizes.shape[0]
    # log-space means, with the rounding of numpy (dense) or scipy (CSR) for cell-eval parity
    # and float64 sums in row order (the pseudobulks of vcell.eval.metrics.pseudobulk)
    for g in range(n_g1 if mean_mode != _MEAN_NONE else 0):
        k = cnt[g]
        off = gstart[g]
        accs[g] = 0.0
        s64 = 0.0
        if mean_mode == _MEAN_DENSE:
            for i in range(off, off + k):
                accs[g] += vals[i]
                s64 += vals[i]
            means[g, j] = accs[g] / scale[g]
        else:
            for i in range(off, off + k):
                accs[g] += vals[i] * scale[g]
                s64 += vals[i]
            means[g, j] = accs[g]
        sums[g, j] = s64

    run_end = work[0]
    table = work[1]
    cursor = work[2]
    stamp_e = work[3]
    mult_e = work[4]
    stamp_g = work[5]
    mult_g = work[6]
    cs, fval, over, fkey = fwork[0], fwork[1], fwork[2], fwork[3]

    k0 = cnt[0]
    cneg, vmin, tscale, n_buckets = _sort_control(vals, gstart[0], k0, cs, table, cursor)
    ctie = 0
    i = 0
    while i < k0:
        e = i + 1
        while e < k0 and cs[e] == cs[i]:
            e += 1
        b = e - i
        ctie += b * b * b - b
        for q in range(i, e):
            run_end[q] = e
        i = e
    n2 = float(sizes[0])
    cz = sizes[0] - k0

    for g in range(1, n_g1):
        k = cnt[g]
        off = gstart[g]
        z1 = sizes[g] - k
        u2 = z1 * (2 * cneg + cz)  # 2U: the group's zeros against the control
        dtie = 0
        n_over = np.int64(0)
        for i in range(off, off + k):
            x = vals[i]
            if x > 0:
                lo = _place(cs, table, x, vmin, tscale, n_buckets)
                less = lo + cz
            else:
                lo = _lower_bound(cs, np.int64(0), cneg, x)
                less = lo
            if lo < k0 and cs[lo] == x:  # x is a control value, held by b control cells
                b = run_end[lo] - lo
                u2 += 2 * less + b
                if stamp_e[lo] != sid:
                    stamp_e[lo] = sid
                    mult_e[lo] = 1
                    dtie += 3 * b * (b + 1)
                else:
                    t = mult_e[lo] + b
                    dtie += 3 * t * (t + 1)
                    mult_e[lo] += 1
            else:  # x falls in the gap just below cs[lo]
                u2 += 2 * less
                if stamp_g[lo] != sid:
                    stamp_g[lo] = sid
                    fval[lo] = x
                    mult_g[lo] = 1
                elif fval[lo] == x:
                    t = mult_g[lo]
                    dtie += 3 * t * (t + 1)
                    mult_g[lo] += 1
                else:
                    over[n_over] = x
                    n_over += 1
        sid += 1
        if n_over > 1:  # cursor is free until the next gene's _sort_control: the table's slot list
            dtie += _distinct_ties(over, n_over, work[7], fkey, cursor)
        nz = float(z1 + cz)  # the pooled zero block is one tie group
        tie = (nz * nz * nz - nz) + float(ctie + dtie)
        u1, p = _mwu_from_u(0.5 * u2, float(sizes[g]), n2, tie)
        stat[g - 1, j] = u1
        pval[g - 1, j] = p
    return sid


@nb.njit(cache=True, error_model="numpy")
def _work_arrays(n_rows, dtype_like):
    """Per-thread work arrays of :func:`_gene_tests` (``dtype_like`` gives the value dtype)."""
    work = np.empty((8, 2 * n_rows + 2), np.int64)  # row 1 (the table) holds up to 2 buckets per value
    work[3, :] = -1  # stamps
    work[5, :] = -1
    work[7, :] = 0  # the counts of _distinct_ties' table, whose keys are fwork[3]
    fwork = np.empty((4, 2 * n_rows + 2), dtype_like.dtype)
    return work, fwork


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _dense_chunk(X, gid, gptr, sizes, scale, mean_mode, j0, j1, stat, pval, means, sums, buf, pos, work, fwork, state):
    """Genes ``j0:j1`` of a dense matrix; returns whether a NaN was seen.

    Rows are read in storage order (a permuted order costs a TLB miss per row strip); each
    gene's buffer row has one region per group, ``gptr[g]:gptr[g + 1]``, filled from its start
    with the group's non-zeros. ``buf``, ``pos``, ``work``, ``fwork`` are the calling thread's
    buffers (:func:`_dense_buffers`), reused from block to block (fresh memory is slow to touch);
    ``state[0]`` carries the stamp id of :func:`_gene_tests` from one block to the next.
    """
    n_g1 = sizes.shape[0]
    cl = j1 - j0
    for g in range(n_g1):
        pos[g, :] = gptr[g]
    nan_seen = False
    for row in range(gid.shape[0]):
        g = gid[row]
        if g < 0:
            continue
        pg = pos[g]
        for jl in range(cl):  # branch-free: store every value, keep the non-zeros
            v = X[row, j0 + jl]
            p = pg[jl]
            buf[jl, p] = v
            pg[jl] = p + (v != 0)
            nan_seen |= v != v
    cnt = np.empty(n_g1, np.int64)
    accs = np.empty(n_g1, X.dtype)
    sid = state[0]
    for jl in range(cl):
        for q in range(n_g1):
            cnt[q] = pos[q, jl] - gptr[q]
        sid = _gene_tests(buf[jl], gptr, cnt, sizes, scale, mean_mode, j0 + jl, stat, pval, means, sums, accs, work, fwork, sid)
    state[0] = sid
    return nan_seen


def _dense_buffers(block: int, n_rows: int, n_groups: int, dtype):
    """One thread's buffers of :func:`_dense_chunk` for blocks of up to ``block`` genes."""
    buf = np.empty((block, n_rows), dtype)
    work, fwork = _work_arrays(n_rows, buf)
    return buf, np.empty((n_groups, block), np.int64), work, fwork, np.zeros(1, np.int64)


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _csr_chunk(data, indices, indptr, order, gid, sizes, scale, mean_mode, j0, j1, stat, pval, means, sums, rb, bi):
    """Genes ``j0:j1`` of a CSR matrix (sorted indices); returns whether a NaN was seen.

    Rows are visited group after group (``order``: the grouped rows, each group in row order;
    ``gid``: each row's group): one group's cells write to the ~``j1 - j0`` regions of that group
    only, where cells in storage order would interleave the groups and keep every (gene,
    group) region open at once (about 30% slower). Each (gene, group) region of the gathered
    values is filled in row order. ``rb[row, bi]`` and ``rb[row, bi + 1]`` bound each row's
    slice when ``rb`` has rows (:func:`vcell.eval._band_kernels.row_bounds`), else they are searched.
    """
    n_vis = order.shape[0]
    n_g1 = sizes.shape[0]
    cl = j1 - j0
    lo_r = np.empty(n_vis, np.int64)
    hi_r = np.empty(n_vis, np.int64)
    cnt = np.zeros((n_g1, cl), np.int64)
    for q in range(n_vis):  # pass 1: this block's slice of every row, non-zeros per group/gene
        row = order[q]
        g = gid[row]
        if rb.shape[0] > 0:
            s = rb[row, bi]
            e = rb[row, bi + 1]
        else:
            s = _lower_bound(indices, indptr[row], indptr[row + 1], j0)
            e = _lower_bound(indices, s, indptr[row + 1], j1)
        lo_r[q] = s
        hi_r[q] = e
        for k in range(s, e):
            if data[k] != 0:
                cnt[g, indices[k] - j0] += 1
    gene_ptr = np.zeros(cl + 1, np.int64)
    cur = np.empty((n_g1, cl), np.int64)  # next free slot of each (gene, group) region
    for jl in range(cl):
        acc = gene_ptr[jl]
        for g in range(n_g1):
            cur[g, jl] = acc
            acc += cnt[g, jl]
        gene_ptr[jl + 1] = acc
    vals = np.empty(gene_ptr[cl], data.dtype)
    nan_seen = False
    for q in range(n_vis):  # pass 2: gather
        g = gid[order[q]]
        for k in range(lo_r[q], hi_r[q]):
            v = data[k]
            if v != 0:
                nan_seen |= v != v
                jl = indices[k] - j0
                vals[cur[g, jl]] = v
                cur[g, jl] += 1
    accs = np.empty(n_g1, data.dtype)
    work, fwork = _work_arrays(n_vis, vals)
    gstart = np.empty(n_g1, np.int64)
    gcnt = np.empty(n_g1, np.int64)
    sid = np.int64(0)
    for jl in range(cl):
        acc = gene_ptr[jl]
        for g in range(n_g1):
            gstart[g] = acc
            gcnt[g] = cnt[g, jl]
            acc += gcnt[g]
        sid = _gene_tests(vals, gstart, gcnt, sizes, scale, mean_mode, j0 + jl, stat, pval, means, sums, accs, work, fwork, sid)
    return nan_seen


@nb.njit(cache=True, error_model="numpy")
def _expm1(a):
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        out[i] = np.expm1(a[i])
    return out


@nb.njit(cache=True, error_model="numpy")
def _fold_changes(t, r, eps, lfc, pc):
    """log2 fold change and percent change of each row of ``t`` against ``r`` (0/0 -> 0)."""
    n_g, n_genes = t.shape
    for j in range(n_genes):
        y = r[j]
        for g in range(n_g):
            x = t[g, j]
            v = np.log2((x + eps) / (y + eps))
            lfc[g, j] = 0.0 if np.isnan(v) else v
            w = (x - y) / (y + eps)  # x - y in the input dtype, as pdex
            pc[g, j] = 0.0 if np.isnan(w) else w
