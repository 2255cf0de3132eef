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

Every gene's sums involve that gene's counts only (and the group's totals), so a matrix in gene
tiles (:mod:`vcell.eval.bands`) is corrected tile by tile (:class:`Jackknife`): each gene's sums
are finished with its tile and kept, and the correction summed over all genes at the end, with
the same arithmetic as on the whole matrix.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np

from vcell.eval._de_engine import _n_threads
from vcell.eval.vcc2026._kernels import value

_BLOCK_CELLS = 256
_BLOCKS_PER_TASK = 8  # blocks of one group a thread takes at a time
#: Largest ``l_i / (S - l_i)`` (a cell's share of its group against the rest) for the series form;
#: larger (groups of a few cells) take the direct form.
_T_MAX = 0.1


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _jack_block(data, indices, indptr, rows, totals, P, S, ts, active, b, s1, s2, colscale):
    """Direct form: add ``v_i - b`` of cells ``rows`` to ``s1`` and their squares to ``s2`` (genes ``active``)."""
    n_act = active.shape[0]
    if n_act == 0:
        return
    for q in range(rows.shape[0]):
        row = rows[q]
        r = S - totals[row]
        k = indptr[row]
        end = indptr[row + 1]
        if r > 0:
            while k < end and indices[k] < active[0]:
                k += 1
            for a in range(n_act):
                j = active[a]
                y = 0.0
                while k < end and indices[k] < j:
                    k += 1
                if k < end and indices[k] == j:
                    y = value(data, k, indices, colscale)
                v = math.log1p(ts * (P[j] - y) / r) - b[a]
                s1[a] += v
                s2[a] += v * v
        else:  # the cell holds every count of its group: its leave-one-out profile is empty
            for a in range(n_act):
                v = -b[a]
                s1[a] += v
                s2[a] += v * v


# fdlibm's log (e_log.c): ln 2 in two parts and the coefficients of its remainder polynomial
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1, _LG2, _LG3 = 6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01
_LG4, _LG5 = 2.222219843214978396e-01, 1.818357216161805012e-01
_LG6, _LG7 = 1.531383769920937332e-01, 1.479819860511658591e-01


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _log_many(x, n, out, e):
    """``out[:n] = log(x[:n])`` for finite ``x >= 1`` (``e``: work of ``n`` floats), within one ulp.

    fdlibm's algorithm in two plain loops that LLVM vectorises, where a loop of ``math.log``
    calls one value at a time (numba vectorises it only with Intel's SVML): 2 ns a value
    against 5.5. ``x = 2^k m`` with ``m`` in ``[sqrt(2)/2, sqrt(2))``: the first loop splits
    the bits, the second evaluates ``k ln 2 + log(m)``.
    """
    xb = x.view(np.int64)
    ob = out.view(np.int64)
    for i in range(n):
        hx = xb[i] >> 32
        up = (((hx & 0x000FFFFF) + 0x95F64) >> 20) & 1  # m >= sqrt(2): use m / 2, and k + 1
        e[i] = float(((hx >> 20) - 1023) + up)
        ob[i] = (((hx & 0x000FFFFF) | (0x3FF00000 ^ (up << 20))) << 32) | (xb[i] & 0xFFFFFFFF)
    for i in range(n):
        f = out[i] - 1.0
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
        hfsq = 0.5 * f * f
        k = e[i]
        out[i] = k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f)


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _jack_sparse(data, indices, indptr, rows, totals, P, S, ts, slot, j0, j1, b, w, s1, s2, colscale, buf, at):
    """Series form, non-zero entries of genes ``j0:j1`` only: add ``d - z`` and ``d^2 - z^2`` per active gene.

    ``d = log(1 + ts * (P - y) / r) - b`` is the entry's deviation, ``z = log(1 + t * w)`` the
    deviation it would have if the count were 0 (``t = l / r``); the all-zero sums come from
    :func:`_zero_sums`. ``slot[j - j0]`` is gene ``j``'s index among this tile's active genes.
    A row's arguments are gathered into ``buf`` (5 rows, a row's length each; ``at``: their
    genes' slots) and their logs taken together (:func:`_log_many`); its absolute error
    (~1e-16) is the size of ``log1p``'s own rounding here, far below what the sums need.
    """
    u, v, lu, lv, e = buf[0], buf[1], buf[2], buf[3], buf[4]
    for q in range(rows.shape[0]):
        row = rows[q]
        lib = totals[row]
        r = S - lib
        t = lib / r
        m = np.int64(0)
        for k in range(indptr[row], indptr[row + 1]):
            j = indices[k]
            if j < j0 or j >= j1:
                continue
            y = value(data, k, indices, colscale)
            if y == 0:
                continue
            a = slot[j - j0]
            u[m] = 1.0 + ts * (P[j] - y) / r
            v[m] = 1.0 + t * w[a]
            at[m] = a
            m += 1
        _log_many(u, m, lu, e)
        _log_many(v, m, lv, e)
        for i in range(m):
            a = at[i]
            d = lu[i] - b[a]
            z = lv[i]
            s1[a] += d - z
            s2[a] += d * d - z * z


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _jack_blocks(data, indices, indptr, rows, totals, P, S, ts, series, slot, active, j0, j1, b, w, colscale, block, out1, out2):
    """The sums of consecutive blocks of ``block`` cells of one group, each from zero, into
    rows of ``out1``/``out2`` (added to the group's sums in block order afterwards: the
    summation of the whole-matrix evaluation, whatever the tiles and threads)."""
    longest = 0
    if series:
        for q in range(rows.shape[0]):
            longest = max(longest, indptr[rows[q] + 1] - indptr[rows[q]])
    buf = np.empty((5, longest), np.float64)
    at = np.empty(longest, np.int64)
    for i in range(out1.shape[0]):
        part = rows[i * block:(i + 1) * block]
        if series:
            _jack_sparse(data, indices, indptr, part, totals, P, S, ts, slot, j0, j1, b, w, out1[i], out2[i], colscale, buf, at)
        else:
            _jack_block(data, indices, indptr, part, totals, P, S, ts, active, b, out1[i], out2[i], colscale)


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _add_blocks(s1, s2, out1, out2):
    """``s += out[i]`` for each block ``i`` in order."""
    for i in range(out1.shape[0]):
        for a in range(s1.shape[0]):
            s1[a] += out1[i, a]
            s2[a] += out2[i, a]


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


_EMPTY = np.empty(0, np.float64)
_NO_SLOT = np.empty(0, np.int64)


class Jackknife:
    """The corrections ``C`` of groups of cells of one matrix, gene tile by gene tile.

    Parameters
    ----------
    group_rows : sequence of numpy.ndarray
        Row indices of each group (a row may repeat).
    raw_sums : numpy.ndarray
        ``(groups, genes)`` summed counts of each group (its pseudobulk), complete.
    totals : numpy.ndarray
        Total count of each row of the matrix (float64).
    ts : float
        Total the profiles are normalised to (5e4 in the challenge).
    colscale : numpy.ndarray, optional
        Column scale of the matrix's values (see :func:`vcell.eval.vcc2026._kernels.value`).
    """

    def __init__(self, group_rows, raw_sums: np.ndarray, totals: np.ndarray, ts: float, colscale: np.ndarray | None = None):
        self.ts, self.totals = float(ts), totals
        self.colscale = _EMPTY if colscale is None else np.asarray(colscale, np.float64)
        self.groups = []
        for g, rows in enumerate(group_rows):
            n = len(rows)
            P = np.ascontiguousarray(raw_sums[g], dtype=np.float64)
            S = float(P.sum())
            if n < 2 or S <= 0:
                continue
            rows = np.asarray(rows, np.int64)
            active = np.flatnonzero(P > 0).astype(np.int64)
            r = S - totals[rows]
            series = bool((r > 0).all()) and float((totals[rows] / r).max()) <= _T_MAX
            t = totals[rows] / r if series else None
            self.groups.append((g, rows, P, S, active, t, np.empty(active.size)))
        self.n_groups = len(group_rows)

    def tile(self, data, indices, indptr, j0: int, j1: int, threads: int = 2) -> None:
        """Finish the sums of genes ``j0:j1`` from a matrix holding (at least) their columns."""
        local, tasks = [], []
        n_threads = _n_threads(threads)
        for gi, (_, rows, P, S, active, t, _) in enumerate(self.groups):
            lo, hi = np.searchsorted(active, [j0, j1])
            x = self.ts * P[active[lo:hi]] / S
            b = np.log1p(x)
            s1, s2 = np.zeros(hi - lo), np.zeros(hi - lo)
            w, slot = _EMPTY, _NO_SLOT
            if t is not None:  # the all-zero part of every gene in closed form; the blocks add the non-zeros
                w = x / (1.0 + x)
                slot = np.full(j1 - j0, -1, np.int64)
                slot[active[lo:hi] - j0] = np.arange(hi - lo)
                _zero_sums(t, w, s1, s2)
            local.append((lo, hi, b, w, slot, s1, s2))
            # a large group (the controls) is shared between the threads too; blocks stay the unit
            n_blocks = -(-rows.size // _BLOCK_CELLS)
            per_task = max(1, min(_BLOCKS_PER_TASK, -(-n_blocks // n_threads)))
            tasks += [(gi, start, per_task) for start in range(0, rows.size, _BLOCK_CELLS * per_task)]

        def work(task):
            gi, start, per_task = task
            _, rows, P, S, active, t, _ = self.groups[gi]
            lo, hi, b, w, slot, *_ = local[gi]
            part = rows[start:start + _BLOCK_CELLS * per_task]
            n_blocks = -(-part.size // _BLOCK_CELLS)
            out1, out2 = np.zeros((n_blocks, hi - lo)), np.zeros((n_blocks, hi - lo))
            _jack_blocks(data, indices, indptr, part, self.totals, P, S, self.ts, t is not None, slot, active[lo:hi], j0, j1, b, w,
                         self.colscale, _BLOCK_CELLS, out1, out2)
            return gi, out1, out2

        if n_threads == 1 or len(tasks) <= 1:
            parts = [work(task) for task in tasks]
        else:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                parts = list(pool.map(work, tasks))
        for gi, out1, out2 in parts:  # in task order: each group's blocks in block order
            _add_blocks(local[gi][5], local[gi][6], out1, out2)
        for (_, rows, _, _, _, _, q), (lo, hi, _, _, _, s1, s2) in zip(self.groups, local, strict=True):
            q[lo:hi] = s2 - s1 * s1 / rows.size

    def result(self) -> np.ndarray:
        """``(groups,)`` corrections (float64, >= 0); 0 for a group of fewer than two cells."""
        out = np.zeros(self.n_groups, np.float64)
        for g, rows, _, _, _, _, q in self.groups:
            n = rows.size
            out[g] = max((n - 1) / n * float(q.sum()), 0.0)
        return out


def jackknife_corrections(X, totals: np.ndarray, group_rows, raw_sums: np.ndarray, ts: float, threads: int = 2) -> np.ndarray:
    """The jackknife correction ``C`` of each group of cells of a CSR matrix in memory (float64, >= 0).

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
    jack = Jackknife(group_rows, raw_sums, totals, ts)
    jack.tile(X.data, X.indices, X.indptr, 0, X.shape[1], threads)
    return jack.result()
