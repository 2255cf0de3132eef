"""How :mod:`vcell.eval.de` hands out its work: the cells grouped, the genes cut into blocks, the
blocks run on threads, band after band for a matrix read from disk (:mod:`vcell.eval.bands`).

A matrix in memory (dense or CSR) is one band covering every gene; a
:class:`~vcell.eval.tiles.TileStore` on disk is swept band by band, each band's tiles cut into
blocks. Every gene's numbers depend only on its own values in row order, so the cut changes
nothing in the results.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError, preview
from vcell.eval._band_kernels import row_bounds
from vcell.eval._de_kernels import _MEAN_DENSE, _MEAN_SPARSE, _csr_chunk, _dense_buffers, _dense_chunk
from vcell.eval.bands import sweep
from vcell.eval.tiles import TileStore

_WORK_ENTRIES = 4_000_000  # per-thread gather buffer of the dense kernel, in matrix entries
_BLOCK_VALUES = 16_000_000  # values a CSR block gathers at most (per thread): bounds its working memory


def _n_threads(threads: int | None) -> int:
    """``threads`` (``None`` or < 1: every CPU this process may use)."""
    if threads is None or threads < 1:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return int(threads)


def _prepare_matrix(X):
    """``("dense", array)``, ``("csr", csr)`` or ``("bands", TileStore)`` with float32/float64
    values, no copy when possible."""
    if X is None:
        raise VcellError("the expression matrix is missing (adata.X is None)")
    if isinstance(X, TileStore):
        return "bands", X
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
    if not all(isinstance(c, str) for c in cat.categories):  # integer guide ids: the labels as the input checks read them
        cat = pd.Categorical(pd.Series(np.asarray(labels, dtype=object)).map(lambda v: v if pd.isna(v) else str(v)))
    cats = np.asarray(cat.categories, dtype=object)
    codes = np.asarray(cat.codes, dtype=np.int64)
    keep_cat = np.array([not (isinstance(c, str) and c == "") and not pd.isna(c) for c in cats], dtype=bool)
    is_ref = np.array([c == reference for c in cats], dtype=bool) & keep_cat
    if not is_ref.any():
        shown = preview(cats[keep_cat], 10, quote=False)
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


def _block_genes(kind: str, n_rows: int, n_genes: int, threads: int, block_genes: int | None, nnz: float = 0.0) -> int:
    """Genes per block: for a dense matrix a gather buffer of ``block x n_rows`` values per
    thread; for CSR at least four blocks per thread (load balance), each gathering at most
    :data:`_BLOCK_VALUES` values (``nnz``: the stored values of these ``n_genes`` genes)."""
    if block_genes:
        return max(1, int(block_genes))
    if kind == "dense":
        b = _WORK_ENTRIES // max(n_rows, 1)
        return int(min(256, max(8, b)))
    # CSR: every block re-locates its slice of each row (binary search), so fewer, larger blocks
    size = -(-n_genes // (4 * max(threads, 1)))
    if nnz > 0:
        size = min(size, int(n_genes * _BLOCK_VALUES / nnz))
    return int(min(1024, max(32, size)))


def _csr_bands(kind, M, budget: float, progress: Progress):
    """``[(tile start, tile stop, (data, indices, indptr)), ...]`` per band, in gene order."""
    if kind == "csr":
        yield [(0, M.shape[1], (M.data, M.indices, M.indptr))]
        return
    for ranges, parts in sweep([M], budget, progress, "testing genes"):
        yield [(j0, j1, p) for (j0, j1), p in zip(ranges, parts[0], strict=True)]


def run_tests(X, labels, reference, threads, block_genes, budget: float = math.inf, progress: Progress = no_progress):
    """The tests, means and sums of every group against ``reference``, every gene:
    ``(names, sizes, stat, pval, means, sums)`` (see :func:`vcell.eval.de.de_arrays`)."""
    kind, M = _prepare_matrix(X)
    n_obs, n_genes = (M.n_rows, M.n_genes) if kind == "bands" else M.shape
    if len(labels) != n_obs:
        raise VcellError(f"{len(labels)} perturbation labels for a matrix of {n_obs} cells")
    names, gid, order, gptr, sizes = _groups(labels, reference)
    dtype = M.dtype
    n_t = len(names)
    stat = np.empty((n_t, n_genes), np.float64)
    pval = np.empty((n_t, n_genes), np.float64)
    means = np.empty((n_t + 1, n_genes), dtype)
    sums = np.zeros((n_t + 1, n_genes), np.float64)
    dense_means = kind == "dense" or (kind == "bands" and M.storage == "dense")
    if dense_means:
        mean_mode = _MEAN_DENSE
        scale = sizes.astype(dtype)  # numpy mean: sum, then divide by n in the array dtype
    else:
        mean_mode = _MEAN_SPARSE
        scale = (1.0 / sizes.astype(np.float64)).astype(dtype)  # scipy mean: sum of x * (1/n)
    if n_genes == 0 or n_t == 0:
        return names, sizes, stat, pval, means, sums
    n_threads = _n_threads(threads)
    groups = (gptr, sizes, scale, mean_mode)
    bad = []
    if kind == "dense":
        chunk = _block_genes(kind, len(order), n_genes, n_threads, block_genes)
        local = threading.local()

        def work(j0):
            bufs = getattr(local, "bufs", None)
            if bufs is None:
                bufs = local.bufs = _dense_buffers(chunk, int(gptr[-1]), len(sizes), M.dtype)
            return _dense_chunk(M, gid, *groups, j0, min(n_genes, j0 + chunk), stat, pval, means, sums, *bufs)

        bad = _map(work, list(range(0, n_genes, chunk)), n_threads)
    else:
        def csr_work(task):
            (data, indices, indptr), j0, j1, rb, bi = task
            return _csr_chunk(data, indices, indptr, order, gid, sizes, scale, mean_mode, j0, j1, stat, pval, means, sums, rb, bi)

        for band in _csr_bands(kind, M, budget, progress):
            tasks = []
            for t0, t1, parts in band:
                nnz = parts[0].size * (t1 - t0) / n_genes if kind == "csr" else parts[0].size
                chunk = _block_genes("csr", len(order), t1 - t0, n_threads, block_genes, nnz)
                starts = list(range(t0, t1, chunk))
                rb = block_bounds(parts, np.array([*starts, t1], np.int64), n_threads)
                tasks += [(parts, j0, min(t1, j0 + chunk), rb, i) for i, j0 in enumerate(starts)]
            bad += _map(csr_work, tasks, n_threads)
    if any(bad):
        raise VcellError("the expression matrix contains NaN values; differential expression needs finite values")
    return names, sizes, stat, pval, means, sums


def block_bounds(parts, bounds: np.ndarray, n_threads: int) -> np.ndarray:
    """Each row's first entry at each of ``bounds`` (genes), rows split over threads (see
    :func:`vcell.eval._band_kernels.row_bounds`)."""
    _, indices, indptr = parts
    n = indptr.shape[0] - 1
    out = np.empty((n, bounds.size), np.int64)
    cuts = np.linspace(0, n, n_threads + 1).astype(np.int64)
    _map(lambda i: row_bounds(indices, indptr, bounds, cuts[i], cuts[i + 1], out), list(range(n_threads)), n_threads)
    return out


def _map(work, tasks: list, n_threads: int) -> list:
    """``work`` over ``tasks`` on ``n_threads`` threads (the kernels release the GIL), in order."""
    if n_threads == 1 or len(tasks) <= 1:
        return [work(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        return list(pool.map(work, tasks))
