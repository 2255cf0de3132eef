"""The sampling correction of the expression error: a delete-one-cell jackknife per group.

For a group of ``n`` cells with summed counts ``P`` (total ``S``) and cell totals ``l_i``, the
pseudobulk profile is ``b = log1p(TS * P / S)``. Deleting cell ``i`` gives
``v_i = log1p(TS * (P - y_i) / (S - l_i))``; the correction is
``C = (n - 1) / n * sum over genes of sum_i (v_i - mean_i v_i)^2`` (0 below two cells), the
part of a squared distance between two profiles that sampling alone puts there. Deleting one
cell moves every gene through the denominator, so every (cell, gene) pair with ``P > 0`` is
evaluated; cells are processed in blocks on several threads, the sums are taken around ``b``
for accuracy.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np

from vcell.eval.de import _n_threads

_BLOCK_CELLS = 256


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _jack_block(data, indices, indptr, rows, totals, P, S, ts, active, b, s1, s2):
    """Add the deviations ``v_i - b`` of cells ``rows`` to ``s1`` and their squares to ``s2``."""
    n_act = active.shape[0]
    for q in range(rows.shape[0]):
        row = rows[q]
        r = S - totals[row]
        k = indptr[row]
        end = indptr[row + 1]
        if r > 0:
            f = ts / r
            for a in range(n_act):
                j = active[a]
                y = 0.0
                while k < end and indices[k] < j:
                    k += 1
                if k < end and indices[k] == j:
                    y = float(data[k])
                v = math.log1p(f * (P[j] - y)) - b[a]
                s1[a] += v
                s2[a] += v * v
        else:  # the cell holds every count of its group: its leave-one-out profile is empty
            for a in range(n_act):
                v = -b[a]
                s1[a] += v
                s2[a] += v * v


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
        active = np.flatnonzero(P > 0).astype(np.int64)
        b = np.log1p(ts * P[active] / S)
        setups[g] = (P, S, active, b, n)
        rows = np.asarray(rows, np.int64)
        for s in range(0, n, _BLOCK_CELLS):
            tasks.append((g, rows[s:s + _BLOCK_CELLS]))

    def work(task):
        g, rows = task
        P, S, active, b, _ = setups[g]
        s1 = np.zeros(active.size, np.float64)
        s2 = np.zeros(active.size, np.float64)
        _jack_block(X.data, X.indices, X.indptr, rows, totals, P, S, float(ts), active, b, s1, s2)
        return g, s1, s2

    n_threads = _n_threads(threads)
    if n_threads == 1 or len(tasks) <= 1:
        parts = [work(t) for t in tasks]
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            parts = list(pool.map(work, tasks))
    acc: dict[int, list[np.ndarray]] = {}
    for g, s1, s2 in parts:
        if g in acc:
            acc[g][0] += s1
            acc[g][1] += s2
        else:
            acc[g] = [s1, s2]
    for g, (s1, s2) in acc.items():
        n = setups[g][4]
        q = s2 - s1 * s1 / n
        out[g] = max((n - 1) / n * float(q.sum()), 0.0)
    return out
