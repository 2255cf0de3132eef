"""Chunked access to an expression matrix, in memory or backed on disk, without densifying it."""

from __future__ import annotations

from collections.abc import Iterator

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
