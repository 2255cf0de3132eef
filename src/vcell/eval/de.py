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
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba as nb
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.errors import VcellError

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

_MEAN_DENSE = 0  # numpy: (sum in row order) / n
_MEAN_SPARSE = 1  # scipy CSR: sum in row order of x * (1 / n)
_WORK_ENTRIES = 4_000_000  # per-thread gather buffer of the dense kernel, in matrix entries


# --------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------


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
        _sift_down(a, lo, 0, end)


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
    cneg = 0
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
    _sort_range(cs, 0, cneg)
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
    table, no sort), the rare distinct values sharing a gap are sorted at the end.
    """
    n_g1 = sizes.shape[0]
    # log-space means, with the rounding of numpy (dense) or scipy (CSR) for cell-eval parity
    # and float64 sums in row order (the pseudobulks of vcell.eval.metrics.pseudobulk)
    for g in range(n_g1):
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
    cs = fwork[0]
    fval = fwork[1]
    over = fwork[2]

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
        n_over = 0
        for i in range(off, off + k):
            x = vals[i]
            if x > 0:
                bk = _bucket(x, vmin, tscale, n_buckets)
                lo = table[bk]
                hi = table[bk + 1]
                if hi - lo > 8:
                    lo = _lower_bound(cs, lo, hi, x)
                else:  # values from index hi on exceed x, and cs[k0] = inf: no bound check
                    lo += cs[lo] < x
                    lo += cs[lo] < x
                    while cs[lo] < x:
                        lo += 1
                less = lo + cz
            else:
                lo = _lower_bound(cs, 0, cneg, x)
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
        if n_over > 1:
            _sort_range(over, 0, n_over)
            i = 0
            while i < n_over:
                e = i + 1
                while e < n_over and over[e] == over[i]:
                    e += 1
                a = e - i
                dtie += a * a * a - a
                i = e
        nz = float(z1 + cz)  # the pooled zero block is one tie group
        tie = (nz * nz * nz - nz) + float(ctie + dtie)
        u1, p = _mwu_from_u(0.5 * u2, float(sizes[g]), n2, tie)
        stat[g - 1, j] = u1
        pval[g - 1, j] = p
    return sid


@nb.njit(cache=True, error_model="numpy")
def _work_arrays(n_rows, dtype_like):
    """Per-thread work arrays of :func:`_gene_tests` (``dtype_like`` gives the value dtype)."""
    work = np.empty((7, 2 * n_rows + 2), np.int64)  # row 1 (the table) holds up to 2 buckets per value
    work[3, :] = -1  # stamps
    work[5, :] = -1
    fwork = np.empty((3, n_rows + 2), dtype_like.dtype)
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
def _csr_chunk(data, indices, indptr, order, gptr, sizes, scale, mean_mode, j0, j1, stat, pval, means, sums):
    """Genes ``j0:j1`` of a CSR matrix (sorted indices); returns whether a NaN was seen."""
    n_rows = order.shape[0]
    n_g1 = sizes.shape[0]
    cl = j1 - j0
    lo_r = np.empty(n_rows, np.int64)
    hi_r = np.empty(n_rows, np.int64)
    cnt = np.zeros((cl, n_g1), np.int64)
    g = 0
    for r in range(n_rows):  # pass 1: this block's slice of every row, non-zeros per gene/group
        while r >= gptr[g + 1]:
            g += 1
        row = order[r]
        s = _lower_bound(indices, indptr[row], indptr[row + 1], j0)
        e = _lower_bound(indices, s, indptr[row + 1], j1)
        lo_r[r] = s
        hi_r[r] = e
        for k in range(s, e):
            if data[k] != 0:
                cnt[indices[k] - j0, g] += 1
    gene_ptr = np.zeros(cl + 1, np.int64)
    for jl in range(cl):
        gene_ptr[jl + 1] = gene_ptr[jl] + cnt[jl].sum()
    vals = np.empty(gene_ptr[cl], data.dtype)
    pos = gene_ptr[:cl].copy()
    nan_seen = False
    for r in range(n_rows):  # pass 2: gather (rows are in group order, so groups stay contiguous)
        for k in range(lo_r[r], hi_r[r]):
            v = data[k]
            if v != 0:
                nan_seen |= v != v
                jl = indices[k] - j0
                vals[pos[jl]] = v
                pos[jl] += 1
    accs = np.empty(n_g1, data.dtype)
    work, fwork = _work_arrays(n_rows, vals)
    gstart = np.empty(n_g1, np.int64)
    sid = 0
    for jl in range(cl):
        acc = gene_ptr[jl]
        for q in range(n_g1):
            gstart[q] = acc
            acc += cnt[jl, q]
        sid = _gene_tests(
            vals, gstart, cnt[jl], sizes, scale, mean_mode, j0 + jl, stat, pval, means, sums, accs, work, fwork, sid
        )
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
        shown = ", ".join(map(str, cats[keep_cat][:10])) + (", ..." if keep_cat.sum() > 10 else "")
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
        shown = ", ".join(map(str, adata.obs.columns[:20]))
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
