"""Raw counts drawn from normalised expression, for scorers that take counts (VCC 2026).

A cell's log1p-normalised profile fixes its expected composition ``p = expm1(x) / sum(expm1(x))``;
its counts are one multinomial draw of ``L`` molecules from ``p``, ``L`` being the cell's library
size (e.g. that of a real control cell drawn at random). Totals are exactly ``L``; a cell
whose profile is all zero gets no counts. Seeded: the same seed gives the same counts.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from vcell.data.validate import CELL_EVAL_MAX_LOG1P
from vcell.errors import VcellError

__all__ = ["draw_library_sizes", "sample_counts"]

_BLOCK_ROWS = 1024


def draw_library_sizes(totals: np.ndarray, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``n`` library sizes drawn with replacement from ``totals`` (e.g. the control cells' totals),
    with ``seed`` or from a generator."""
    totals = np.asarray(totals, dtype=np.float64)
    if totals.size == 0:
        raise VcellError("no library sizes to draw from (no control cells)")
    rng = np.random.default_rng(seed)
    return np.rint(totals[rng.integers(0, totals.size, size=n)]).astype(np.int64)


def sample_counts(X, library_sizes: np.ndarray, seed: int | np.random.Generator = 0, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """Integral counts for each row of log1p-normalised ``X``, row ``i`` summing to ``library_sizes[i]``.

    Parameters
    ----------
    X : numpy array or scipy sparse matrix
        log1p-normalised expression, cells x genes (non-negative).
    library_sizes : numpy.ndarray
        Total count of each cell (integers >= 0).
    seed : int or numpy.random.Generator
        Seed of the draws, or the generator to draw from (rows are drawn in order, one after
        the other: rows drawn in several calls from one generator are the rows drawn in one).
    rows : numpy.ndarray, optional
        Draw for these rows of ``X`` only (read block by block: ``X`` is not copied).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 counts, no explicit zeros.
    """
    rows = np.arange(X.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    n = rows.size
    sizes = np.asarray(library_sizes, dtype=np.int64)
    if sizes.shape != (n,):
        raise VcellError(f"{sizes.size} library sizes for {n} cells")
    if (sizes < 0).any():
        raise VcellError("library sizes must be >= 0")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    blocks = []
    for s in range(0, n, _BLOCK_ROWS):
        block = X[rows[s:s + _BLOCK_ROWS]]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        if not np.isfinite(block).all() or (block < 0).any():
            raise VcellError("expression values must be finite and >= 0 (log1p-normalised) to draw counts")
        if block.max(initial=0.0) >= CELL_EVAL_MAX_LOG1P:  # log1p of a cell normalised to 1e4 stays below ~9.2
            raise VcellError(f"expression value {block.max():g} is not log1p-normalised (below {CELL_EVAL_MAX_LOG1P:g}): "
                             "counts already? they are drawn from log1p values")
        expr = np.expm1(block)
        totals = expr.sum(axis=1, keepdims=True)
        empty = totals[:, 0] <= 0
        p = np.divide(expr, totals, out=np.zeros_like(expr), where=totals > 0)
        m = sizes[s:s + _BLOCK_ROWS].copy()
        m[empty] = 0
        p[empty, 0] = 1.0  # any valid composition; zero molecules are drawn from it
        counts = rng.multinomial(m, p)
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    out = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, X.shape[1]), dtype=np.float32)
    out.eliminate_zeros()
    return out
