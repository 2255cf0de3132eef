"""The sampling correction of the expression error: a delete-one-cell jackknife per group.

For a group of ``n`` cells with summed counts ``P`` (total ``S``) and cell totals ``l_i``, the
pseudobulk profile is ``b = log1p(TS * P / S)``. Deleting cell ``i`` gives
``v_i = log1p(TS * (P - y_i) / (S - l_i))``; the correction is
``C = (n - 1) / n * sum over genes of sum_i (v_i - mean_i v_i)^2`` (0 below two cells), the
part of a squared distance between two profiles that sampling alone puts there. Deleting one
cell moves every gene through the denominator, so a zero count deviates too: by
``log1p(t_i * w)`` with ``t_i = l_i / (S - l_i)`` and ``w = x / (1 + x)``, ``x = TS * P / S``.
When every ``t_i`` is small (groups of more than a few cells) the sums of those terms over all
cells are a power series in ``t`` (per gene: ``sum_k c_k w^k sum_i t_i^k``, summed to 1e-18),
and only the non-zero counts are visited, each replacing its zero-count term by its own; small
groups are evaluated cell by cell. Sums are taken around ``b``; cells run in blocks on threads.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np

from vcell.eval.de import _n_threads

_BLOCK_CELLS = 256
#: Largest ``l_i / (S - l_i)`` (a cell's share of its group against the rest) for the series form;
#: larger (groups of a few cells) take the direct form.
_T_MAX = 0.1


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _jack_block(data, indices, indptr, rows, totals, P, S, ts, active, b, s1, s2):
    """Direct form: add ``v_i - b`` of cells ``rows`` to ``s1`` and their squares to ``s2`` (every active gene)."""
    n_act = active.shape[0]
    for q in range(rows.shape[0]):
        row = rows[q]
        r = S - totals[row]
        k = indptr[row]
        end = indptr[row + 1]
        if r > 0:
            for a in range(n_act):
                j = active[a]
                y = 0.0
                while k < end and indices[k] < j:
                    k += 1
                if k < end and indices[k] == j:
                    y = float(data[k])
                v = math.log1p(ts * (P[j] - y) / r) - b[a]
                s1[a] += v
                s2[a] += v * v
        else:  # the cell holds every count of its group: its leave-one-out profile is empty
            for a in range(n_act):
                v = -b[a]
                s1[a] += v
                s2[a] += v * v


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _jack_sparse(data, indices, indptr, rows, totals, P, S, ts, slot, b, w, s1, s2):
    """Series form, non-zero entries only: add ``d - z`` and ``d^2 - z^2`` per active gene.

    ``d = log1p(ts * (P - y) / r) - b`` is the entry's deviation, ``z = log1p(t * w)`` the
    deviation it would have if the count were 0 (``t = l / r``); the all-zero sums come from
    :func:`_zero_sums`. ``slot[j]`` is gene ``j``'s index among the active genes.
    """
    for q in range(rows.shape[0]):
        row = rows[q]
        lib = totals[row]
        r = S - lib
        t = lib / r
        for k in range(indptr[row], indptr[row + 1]):
            y = float(data[k])
            if y == 0:
                continue
            j = indices[k]
            a = slot[j]
            # log(1 + v) rather than log1p(v): twice as fast, and its absolute error (~1e-16) is
            # the size of log1p's own rounding here, far below what the sums need
            d = math.log(1.0 + ts * (P[j] - y) / r) - b[a]
            z = math.log(1.0 + t * w[a])
            s1[a] += d - z
            s2[a] += d * d - z * z


@nb.njit(cache=True, error_model="numpy")
def _zero_sums(t, w, s1, s2):
    """Add, per gene, sum over cells of ``log1p(t_i w)`` and of its square (power series in ``t w``).

    Valid for ``max(t) <= _T_MAX``: terms are added until ``max(t)^k`` drops below 1e-18.
    """
    tmax = 0.0
    for i in range(t.shape[0]):
        tmax = max(tmax, t[i])
    n_terms = 1
    p = tmax
    while p > 1e-18 and n_terms < 200:
        p *= tmax
        n_terms += 1
    T = np.zeros(n_terms + 1)
    for i in range(t.shape[0]):
        v = t[i]
        acc = v
        for k in range(1, n_terms + 1):
            T[k] += acc
            acc *= v
    for a in range(w.shape[0]):
        x = w[a]
        xk = x
        h = 0.0  # harmonic number H_{k-1}
        for k in range(1, n_terms + 1):
            term = xk * T[k]
            sign = 1.0 if k % 2 == 1 else -1.0
            s1[a] += sign * term / k
            if k >= 2:
                s2[a] += -sign * 2.0 * h / k * term
            h += 1.0 / k
            xk *= x


def jackknife_corrections(X, totals: np.ndarray, group_rows, raw_sums: np.ndarray, ts: float, threads: int = 2) -> np.ndarray:
    """The jackknife correction ``C`` of each group of cells (float64, >= 0).

    Parameters
    ----------
    X : scipy.sparse.csr_matrix
        Raw counts, cells x genes (canonical CSR).
    totals : numpy.ndarray
        Total count of each row of ``X`` (float64).
    group_rows : sequence of numpy.ndarray
        Row indices of each group.
    raw_sums : numpy.ndarray
        ``(groups, genes)`` summed counts of each group (its pseudobulk).
    ts : float
        Total the profiles are normalised to (5e4 in the challenge).
    threads : int
        Threads for the cell blocks.

    Returns
    -------
    numpy.ndarray
        ``(groups,)`` corrections.
    """
    out = np.zeros(len(group_rows), np.float64)
    tasks, setups = [], {}
    for g, rows in enumerate(group_rows):
        n = len(rows)
        P = np.ascontiguousarray(raw_sums[g], dtype=np.float64)
        S = float(P.sum())
        if n < 2 or S <= 0:
            continue
        rows = np.asarray(rows, np.int64)
        active = np.flatnonzero(P > 0).astype(np.int64)
        x = ts * P[active] / S
        b = np.log1p(x)
        r = S - totals[rows]
        series = bool((r > 0).all()) and float((totals[rows] / r).max()) <= _T_MAX
        init = (np.zeros(active.size), np.zeros(active.size))
        if series:  # the all-zero part of every gene in closed form; the blocks add the non-zeros
            w = x / (1.0 + x)
            slot = np.full(P.size, -1, np.int64)
            slot[active] = np.arange(active.size)
            _zero_sums(totals[rows] / r, w, *init)
            setups[g] = (P, S, active, b, n, w, slot, init)
        else:
            setups[g] = (P, S, active, b, n, None, None, init)
        for s in range(0, n, _BLOCK_CELLS):
            tasks.append((g, rows[s:s + _BLOCK_CELLS]))

    def work(task):
        g, rows = task
        P, S, active, b, _, w, slot, _ = setups[g]
        s1 = np.zeros(active.size, np.float64)
        s2 = np.zeros(active.size, np.float64)
        if w is not None:
            _jack_sparse(X.data, X.indices, X.indptr, rows, totals, P, S, float(ts), slot, b, w, s1, s2)
        else:
            _jack_block(X.data, X.indices, X.indptr, rows, totals, P, S, float(ts), active, b, s1, s2)
        return g, s1, s2

    n_threads = _n_threads(threads)
    if n_threads == 1 or len(tasks) <= 1:
        parts = [work(t) for t in tasks]
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            parts = list(pool.map(work, tasks))
    acc = {g: list(setup[7]) for g, setup in setups.items()}
    for g, s1, s2 in parts:
        acc[g][0] += s1
        acc[g][1] += s2
    for g, (s1, s2) in acc.items():
        n = setups[g][4]
        q = s2 - s1 * s1 / n
        out[g] = max((n - 1) / n * float(q.sum()), 0.0)
    return out
