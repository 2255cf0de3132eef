"""Library-size normalisation and log1p of raw counts, and helpers shared by the preprocessing steps.

The arithmetic is scanpy's ``normalize_total`` + ``log1p`` (float32, same rounding), written per
row block so that a file streamed in blocks (:mod:`vcell.data.preprocess_stream`) and a matrix in
memory (one block) give the same numbers: :func:`row_totals` then :func:`log1p_normalize`, which
may be applied to any subset of the block's columns once the totals of the full rows are known.

Every function that takes an :class:`~anndata.AnnData` returns a new object; the input is never
modified in place.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping

import anndata as ad
import numba
import numpy as np
from scipy import sparse

from vcell.errors import VcellError

# One logger for the whole preprocessing pipeline (`vcell data preprocess`), whichever module logs.
logger = logging.getLogger("vcell.data.preprocess")

NEGATIVE, NOT_FINITE, NOT_INTEGER = 1, 2, 4  # flags of :func:`count_flags`


def _vcell_uns(adata_or_uns) -> dict:
    """A fresh copy of ``uns["vcell"]`` (so edits never reach a shared dict); ``{}`` when it is not a mapping."""
    uns = adata_or_uns.uns if isinstance(adata_or_uns, ad.AnnData) else adata_or_uns
    meta = uns.get("vcell", {})
    if not isinstance(meta, Mapping):
        logger.warning("uns['vcell'] is a %s, not a mapping of vcell's metadata: ignored", type(meta).__name__)
        return {}
    return dict(meta)


def _require_x(adata: ad.AnnData, what: str) -> None:
    if adata.isbacked:
        raise VcellError(f"{what}: the data is opened backed (on disk); load it into memory first")
    if adata.X is None:
        raise VcellError(f"{what}: the AnnData has no expression matrix X")


def check_target_sum(target_sum) -> float:
    """``target_sum`` as a float, or a one-line error unless it is a positive finite number."""
    if not (isinstance(target_sum, numbers.Real) and math.isfinite(target_sum) and target_sum > 0):
        raise VcellError(f"target_sum must be a positive number, got {target_sum!r}")
    return float(target_sum)


@numba.njit(cache=True, nogil=True)
def _flags(vals):
    flags = 0
    for k in range(vals.size):
        v = vals[k]
        if not np.isfinite(v):
            flags |= 2
        elif v < 0:
            flags |= 1
        elif v != np.floor(v):
            flags |= 4
    return flags


def count_flags(block) -> int:
    """Bit flags of a block of raw counts: ``NEGATIVE``, ``NOT_FINITE``, ``NOT_INTEGER`` values present."""
    vals = block.data if sparse.issparse(block) else np.asarray(block)
    vals = np.ascontiguousarray(vals).reshape(-1)
    if vals.size == 0 or vals.dtype.kind in "biu":
        return NEGATIVE if vals.size and vals.dtype.kind == "i" and vals.min() < 0 else 0
    if vals.dtype == np.float16:
        vals = vals.astype(np.float32)
    return int(_flags(vals))


def raise_count_flags(flags: int) -> None:
    """Raise (negative, NaN/inf values) or warn (non-integer values) about what :func:`count_flags` found."""
    if flags & NEGATIVE:
        raise VcellError("X has negative values; expected raw counts")
    if flags & NOT_FINITE:
        raise VcellError("X has NaN or infinite values; expected raw counts")
    if flags & NOT_INTEGER:
        logger.warning("X has non-integer values; normalising them as if they were counts")


@numba.njit(cache=True, nogil=True)
def _csr_totals(indptr, data, out):
    for i in range(out.size):
        count = 0.0  # float64 accumulator, stored as float32: scanpy's _normalize_csr
        for j in range(indptr[i], indptr[i + 1]):
            count += data[j]
        out[i] = count


def _float32(block):
    """A block as float32 (CSR stays CSR, sharing its index arrays; dense becomes an ndarray)."""
    if sparse.issparse(block):
        block = block if block.format == "csr" else block.tocsr()
        data = block.data if block.data.dtype == np.float32 else block.data.astype(np.float32)
        return sparse.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
    return np.asarray(block, dtype=np.float32)


def row_totals(block) -> np.ndarray:
    """Per-row totals of a block of counts, as scanpy's ``normalize_total`` computes them (float32)."""
    block = _float32(block)
    if sparse.issparse(block):
        out = np.zeros(block.shape[0], dtype=np.float32)
        _csr_totals(block.indptr, block.data, out)
        return out
    return np.sum(block, axis=1)


def log1p_normalize(block, totals: np.ndarray, target_sum: float, then_expm1: bool = False):
    """``log1p(block / totals * target_sum)`` in float32, rows with a zero total left at zero.

    ``block`` holds rows of counts (CSR or dense; any subset of the columns whose full-row sums
    are ``totals`` from :func:`row_totals`). Returns a new float32 block of the same format (CSR
    for sparse input; float64 if ``totals`` are); the input is not modified. ``then_expm1``:
    ``expm1`` of that (what scanpy's seurat HVG flavour computes its moments on), without a second
    block; a CSR result then shares the input's index arrays.
    """
    scale = totals / float(target_sum)
    scale = scale + (scale == 0)
    block = _float32(block)
    if sparse.issparse(block):
        data = _csr_log1p(block, scale, then_expm1)
        if then_expm1:  # read once by the caller (moments): the index arrays are shared, not copied
            return sparse.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
        return sparse.csr_matrix((data, block.indices.copy(), block.indptr.copy()), shape=block.shape)
    out = np.true_divide(block, scale[:, None])
    np.log1p(out, out=out)
    if then_expm1:
        np.expm1(out, out=out)
    return out


#: Counts below this are looked up in a per-row table (97% of the non-zeros of a ~20k-UMI cell).
TABLE_COUNTS = 16


def _csr_log1p(block: sparse.csr_matrix, scale: np.ndarray, then_expm1: bool) -> np.ndarray:
    """``log1p(data / scale[row])`` (then ``expm1``) of a float32 CSR block's stored values.

    Each row's small whole counts take their value from a table of the same numpy expression
    (``log1p(k / scale[row])`` for ``k < TABLE_COUNTS``), computed once per row: the same bits as
    computing every value, which is done for the other values only.
    """
    def f(x: np.ndarray) -> np.ndarray:
        np.log1p(x, out=x)
        if then_expm1:
            np.expm1(x, out=x)
        return x

    if block.shape[0] * TABLE_COUNTS > block.nnz:  # few values per row: no table
        return f(block.data / np.repeat(scale, np.diff(block.indptr)))
    tables = f(np.arange(TABLE_COUNTS, dtype=np.float32)[None, :] / scale[:, None])
    out = np.empty(block.nnz, dtype=tables.dtype)  # float64 where the totals are (numpy's promotion, as computed whole)
    room = max(4096, block.nnz // 8)  # the other values' places; all of them in the rare block that needs it
    pos, rows = np.empty(room, np.int64), np.empty(room, np.int64)
    n_other = _table_lookup(block.indptr, block.data, tables, out, pos, rows)
    if n_other > room:
        pos, rows = np.empty(n_other, np.int64), np.empty(n_other, np.int64)
        _table_lookup(block.indptr, block.data, tables, out, pos, rows)
    pos, rows = pos[:n_other], rows[:n_other]
    out[pos] = f(block.data[pos] / scale[rows])
    return out


@numba.njit(cache=True, nogil=True)
def _table_lookup(indptr, data, tables, out, pos, rows):
    """``out[p] = tables[row, data[p]]`` where ``data[p]`` is a whole number below the table's width; the
    other values' places and rows go to ``pos`` and ``rows`` while they fit. Returns how many there are."""
    width = tables.shape[1]
    room = pos.size
    k = 0
    for r in range(indptr.size - 1):
        for p in range(indptr[r], indptr[r + 1]):
            x = data[p]
            if x >= 0 and x < width and x == np.floor(x):
                out[p] = tables[r, np.int64(x)]
            else:
                if k < room:
                    pos[k] = p
                    rows[k] = r
                k += 1
    return k


def normalize_log1p(adata: ad.AnnData, target_sum: float = 1e4, counts_layer: str = "counts") -> ad.AnnData:
    """Library-size normalise and log1p-transform raw counts.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` (dense or sparse).
    target_sum
        Total count of every cell after normalisation.
    counts_layer
        Layer that receives an unmodified copy of the raw counts.

    Returns
    -------
    AnnData
        A new object with float32 ``log1p(normalised counts)`` in ``X`` (sparse format kept),
        ``layers[counts_layer]``, ``uns["log1p"]`` and ``uns["vcell"]`` (``expression="log1p"``,
        ``target_sum``).
    """
    _require_x(adata, "normalize_log1p")
    target_sum = check_target_sum(target_sum)
    if "log1p" in adata.uns:
        raise VcellError("X is already log1p-transformed (uns['log1p'] is present); expected raw counts")
    raise_count_flags(count_flags(adata.X))

    out = adata.copy()
    out.layers[counts_layer] = adata.X.copy()
    totals = row_totals(adata.X)
    n_empty = int(np.sum(totals == 0))
    if n_empty:
        logger.warning("%d cells have zero total counts; they stay all-zero after normalisation", n_empty)
    out.X = log1p_normalize(adata.X, totals, target_sum)
    out.uns["log1p"] = {"base": None}
    meta = _vcell_uns(out)
    meta.update(expression="log1p", target_sum=target_sum)
    out.uns["vcell"] = meta
    logger.info("normalised %s cells to %g counts and log1p-transformed", f"{out.n_obs:,}", target_sum)
    return out
