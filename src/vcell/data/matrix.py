"""Chunked access to an expression matrix, in memory or backed on disk, without densifying it, and the
one scan of its values (NaN/inf, negative, non-integer, maximum) every expression check uses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp


def iter_row_chunks(X, chunk_rows: int = 4096) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """Yield ``(start_row, block)`` over ``X`` in blocks of ``chunk_rows`` rows.

    ``X`` may be a numpy array, a scipy sparse matrix, an h5py dataset, or an anndata backed
    sparse dataset; only one block is in memory at a time.
    """
    n = X.shape[0]
    if sp.issparse(X) and not sp.isspmatrix_csr(X):
        X = sp.csr_matrix(X)
    for start in range(0, n, chunk_rows):
        block = X[start : min(start + chunk_rows, n)]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
        else:
            block = np.asarray(block)
        yield start, block


def block_values(block) -> np.ndarray:
    """The stored values of a block: all entries if dense, the explicit non-zeros if sparse."""
    return block.data if sp.issparse(block) else block.ravel()


def locate(block, flat_pos: int) -> tuple[int, int]:
    """Row and column (within the block) of the ``flat_pos``-th value of :func:`block_values`."""
    if sp.issparse(block):
        row = int(np.searchsorted(block.indptr, flat_pos, side="right") - 1)
        return row, int(block.indices[flat_pos])
    return divmod(int(flat_pos), block.shape[1])


def storage_kind(X) -> str:
    """A short name for how ``X`` is stored: ``dense``, ``csr``, ``csc``, ... (``backed`` noted)."""
    name = type(X).__name__.lower()
    if "csr" in name or (hasattr(X, "format") and getattr(X, "format", "") == "csr"):
        kind = "csr"
    elif "csc" in name or getattr(X, "format", "") == "csc":
        kind = "csc"
    elif sp.issparse(X):
        kind = X.format
    else:
        kind = "dense"
    backed = not isinstance(X, np.ndarray) and not sp.issparse(X)
    return f"{kind} (backed)" if backed else kind


@dataclass
class MatrixStats:
    """What a scan of the matrix found (first offending positions kept for messages)."""

    nan: tuple[int, int] | None = None
    negative: tuple[int, int, float] | None = None
    non_integer: tuple[int, int, float] | None = None
    max_value: float = 0.0
    max_pos: tuple[int, int] | None = None
    n_values: int = 0
    all_integer: bool = True
    has_fraction: bool = False


@numba.njit(cache=True, nogil=True)
def scan_values(vals, frac_eps):
    """One pass: first non-finite, negative, non-integer and (frac > eps) positions; max and its position."""
    bad = neg = nonint = frac = -1
    vmax, pmax = -np.inf, -1
    for k in range(vals.size):
        v = vals[k]
        if not np.isfinite(v):
            if bad < 0:
                bad = k
            continue
        if v < 0 and neg < 0:
            neg = k
        f = v - np.floor(v)
        if f != 0:
            if nonint < 0:
                nonint = k
            if frac < 0 and f > frac_eps and v >= 0:
                frac = k
        if v > vmax:
            vmax, pmax = v, k
    return bad, neg, nonint, frac, vmax, pmax


# Fast-math without 'nnan'/'ninf': the reductions may be reordered (vectorised) but NaN and inf survive.
_REORDER = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, nogil=True, fastmath=_REORDER)
def _summarise_values(vals):
    """Branch-free pass: min, max, the float64 sum (not finite iff a value is NaN/inf), the largest fractional part."""
    vmin, vmax, total, fmax = np.inf, -np.inf, 0.0, 0.0
    for k in range(vals.size):
        v = vals[k]
        vmin = min(vmin, v)
        vmax = max(vmax, v)
        total += v
        fmax = max(fmax, v - np.floor(v))
    return vmin, vmax, total, fmax


@numba.njit(cache=True, nogil=True)
def _first_fractions(vals, frac_eps):
    """First positions of a non-integer value and of a fractional part above ``frac_eps`` (finite, >= 0 values)."""
    nonint = -1
    for k in range(vals.size):
        f = vals[k] - np.floor(vals[k])
        if f != 0:
            if nonint < 0:
                nonint = k
            if f > frac_eps:
                return nonint, k
    return nonint, -1


@numba.njit(cache=True, nogil=True)
def _first_index(vals, value):
    """Position of the first element equal to ``value`` (-1 if none); no temporary, unlike np.argmax on a map."""
    for k in range(vals.size):
        if vals[k] == value:
            return k
    return -1


def in_precision(eps: float, dtype):
    """``eps`` in the precision of float values of ``dtype``: cell-eval compares ``np.modf(X) > 1e-3``
    in X's precision, so a float32 fraction of float32(1e-3) is no fraction above it."""
    dtype = np.dtype(dtype)
    return dtype.type(eps) if dtype.kind == "f" else eps


def _scan_block(block, frac_eps: float):
    """Scan one block: the vectorised summary, and the exact positions only where something was found."""
    return _scan_array(np.ascontiguousarray(block_values(block)).reshape(-1), frac_eps)


def _scan_array(vals: np.ndarray, frac_eps: float):
    """:func:`_scan_block` of a block's stored values."""
    if vals.size == 0:
        return None
    if vals.dtype == np.float16 or vals.dtype.kind == "b":  # numba's kernels take neither; float32 holds them exactly
        vals = vals.astype(np.float32)
    frac_eps = in_precision(frac_eps, vals.dtype)
    vmin, vmax, total, fmax = _summarise_values(vals)
    if not np.isfinite(total) or vmin < 0:
        return ("full", vals.size, scan_values(vals, frac_eps))
    nonint, frac = _first_fractions(vals, frac_eps) if fmax != 0 else (-1, -1)
    pmax = _first_index(vals, vmax)  # first occurrence, as the full scan
    return ("fast", vals.size, (-1, -1, nonint, frac, vmax, pmax))


def scan_matrix(X, chunk_rows: int = 4096, frac_eps: float = 1e-3, threads: int = 2) -> MatrixStats:
    """Scan ``X`` block by block for NaN/inf, negative and non-integer values and the maximum.

    ``has_fraction`` records whether any value has a fractional part above ``frac_eps``
    (cell-eval's test for log-normalised data). Blocks are scanned on ``threads`` threads, at
    most ``threads`` of them in memory at a time; positions reported are the first in row order.
    """
    stats = _scan_stored_values(X, frac_eps, threads)
    if stats is not None:
        return stats
    stats = MatrixStats()

    def fold(job, found) -> None:
        start, block = job
        vals = block_values(block).reshape(-1)

        def at(k: int) -> tuple[int, int]:
            r, c = locate(block, k)
            return start + r, c

        _fold(stats, found, at, lambda k: float(vals[k]))

    chunk_rows = max(1, min(chunk_rows, -(-X.shape[0] // max(1, 4 * threads)))) if threads > 1 else chunk_rows
    _in_order(iter_row_chunks(X, chunk_rows), lambda start, block: _scan_block(block, frac_eps), fold, threads)
    return stats


def _fold(stats: MatrixStats, found, at, value) -> None:
    """Add one block's scan (:func:`_scan_array`'s result) to ``stats``, blocks taken in row order:
    ``at(k)`` is the (row, column) of the block's ``k``-th stored value, ``value(k)`` the value."""
    if found is None:
        return
    _, n_values, (bad, neg, nonint, frac, vmax, pmax) = found
    stats.n_values += n_values
    if bad >= 0 and stats.nan is None:
        stats.nan = at(bad)
    if neg >= 0 and stats.negative is None:
        stats.negative = (*at(neg), value(neg))
    if nonint >= 0:
        stats.all_integer = False
        if stats.non_integer is None:
            stats.non_integer = (*at(nonint), value(nonint))
    stats.has_fraction = stats.has_fraction or frac >= 0
    if pmax >= 0 and (vmax > stats.max_value or stats.max_pos is None):
        stats.max_value, stats.max_pos = float(vmax), at(pmax)


def _in_order(jobs, scan, fold, threads: int) -> None:
    """``scan(*job)`` of each job on ``threads`` threads, at most ``threads`` jobs ahead of the
    oldest; ``fold(job, result)`` in the jobs' order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append((job, pool.submit(scan, *job)))
            if len(pending) > threads:
                done, fut = pending.popleft()
                fold(done, fut.result())
        while pending:
            done, fut = pending.popleft()
            fold(done, fut.result())


#: Stored values :func:`_scan_stored_values` reads and scans at a time (32 MB of float32).
DIRECT_VALUES = 1 << 23


def _scan_stored_values(X, frac_eps: float, threads: int) -> MatrixStats | None:
    """:func:`scan_matrix` of a backed CSR matrix whose ``data`` is uncompressed: its stored values only,
    read straight from the file (:mod:`vcell.data.h5direct`) in blocks of :data:`DIRECT_VALUES`.

    The column indices, half of the bytes, are not read, and no sparse block is built; a value's
    row comes from ``indptr`` and its column from one element of ``indices``. ``None`` when ``X``
    is not such a matrix (the caller then reads row blocks).
    """
    import vcell.data.h5direct as h5direct
    from vcell.errors import VcellError

    group = getattr(X, "group", None)
    if group is None or getattr(X, "format", None) != "csr" or not h5direct.AVAILABLE:
        return None
    try:
        data, indices = group["data"], group["indices"]
        indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        filename = group.file.filename
    except (KeyError, TypeError, OSError):
        return None
    n = int(indptr[-1]) if indptr.size else 0
    ext, _ = h5direct.extents(data)
    if ext is None or data.ndim != 1 or n > data.shape[0] or indptr.size != X.shape[0] + 1 or (np.diff(indptr) < 0).any():
        return None
    try:
        fd = os.open(filename, os.O_RDONLY)
    except OSError:  # e.g. a file h5py holds in memory
        return None
    try:
        if not h5direct.verify(fd, data, ext):
            return None
        stats = MatrixStats()

        def scan(lo: int, hi: int):
            vals = np.empty(hi - lo, dtype=ext.dtype)
            if not h5direct.read_ranges(fd, ext, np.array([lo], np.int64), np.array([hi], np.int64), vals, np.zeros(1, np.int64)):
                raise VcellError(f"{filename}: the file is shorter than its layout says (it changed or is truncated)")
            found = _scan_array(vals, frac_eps)
            # the few values a message may quote, not the block: it is freed as soon as it is scanned
            return found, ({} if found is None else {k: float(vals[k]) for k in found[2][1:3] if k >= 0})

        def fold(job, result) -> None:
            lo, _ = job
            found, values = result

            def at(k: int) -> tuple[int, int]:  # a value's row from indptr, its column read from the file
                return int(np.searchsorted(indptr, lo + k, side="right") - 1), int(indices[lo + k])

            _fold(stats, found, at, values.__getitem__)

        _in_order(((lo, min(lo + DIRECT_VALUES, n)) for lo in range(0, n, DIRECT_VALUES)), scan, fold, threads)
        return stats
    finally:
        os.close(fd)
