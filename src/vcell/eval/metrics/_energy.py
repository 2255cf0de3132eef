"""Energy distances of cell sets (``pearson_edistance``), with cell-eval's float32 arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

__all__ = ["EnergyDistances", "as_rows", "energy_distance", "energy_distances", "mean_pairwise_distance"]


@dataclass(frozen=True)
class EnergyDistances:
    """Energy distance of each perturbation's cells to the control cells, ``[n_perts]`` each,
    computed within the prediction (pred cells vs pred controls) and within the real data."""

    real: np.ndarray
    pred: np.ndarray


def as_rows(X, idx: np.ndarray):
    """Rows ``idx`` of ``X`` in their own dtype: sparse as CSR, anything else dense."""
    block = X[idx]
    return sparse.csr_matrix(block) if sparse.issparse(block) else np.asarray(block)


def _float64(a):
    return a.astype(np.float64) if sparse.issparse(a) else np.asarray(a, dtype=np.float64)


def _sq_norms(a) -> np.ndarray:
    if sparse.issparse(a):
        return np.asarray(a.multiply(a).sum(axis=1)).reshape(-1)
    return np.einsum("ij,ij->i", a, a)


#: Sparse cells at least this dense are multiplied as dense blocks: scipy's sparse product costs
#: ~100x more per multiply-add than BLAS, which wins once most pairs of rows share genes.
DENSE_FROM = 0.1
#: Largest dense block of rows made from a sparse matrix at a time (bytes, float64).
DENSE_BLOCK_BYTES = 32 << 20


def _density(x) -> float:
    return x.nnz / max(1, x.shape[0] * x.shape[1]) if sparse.issparse(x) else 1.0


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _gram(a, b) -> np.ndarray:
    """``a @ b.T`` as a dense float64 array; dense enough sparse rows are densified block by block."""
    if not (sparse.issparse(a) or sparse.issparse(b)):
        return np.asarray(a @ b.T)
    if min(_density(a), _density(b)) < DENSE_FROM:
        return _dense(a @ b.T)
    rows = max(1, DENSE_BLOCK_BYTES // (8 * a.shape[1]))
    out = np.empty((a.shape[0], b.shape[0]))
    for i in range(0, a.shape[0], rows):
        block = _dense(a[i:i + rows])
        for j in range(0, b.shape[0], rows):
            out[i:i + rows, j:j + rows] = block @ _dense(b[j:j + rows]).T
    return out


def _squared_distances(a, b, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    d2 = -2.0 * _gram(a, b)
    d2 += na[:, None]
    d2 += nb[None, :]
    return d2


def mean_pairwise_distance(a, b=None, chunk: int = 2048):
    """Mean Euclidean distance over all pairs (rows of ``a``) x (rows of ``b``).

    With ``b`` omitted: over all ordered pairs of rows of ``a``, the zero diagonal included (as
    cell-eval's ``pairwise_distances(x).mean()``). Dense or CSR input.

    Precision follows the input, as cell-eval's scikit-learn call does: float64 input is summed
    in float64, ``chunk`` rows at a time; when both inputs are float32, each distance is rounded
    to float32 (squared distance computed in float64) and the mean is taken in float32 over the
    whole ``[n_a, n_b]`` float32 matrix (which is therefore held in memory), returning a
    ``numpy.float32``.
    """
    same = b is None
    b = a if same else b
    float32 = a.dtype == np.float32 and b.dtype == np.float32
    a64 = _float64(a)
    b64 = a64 if same else _float64(b)
    na = _sq_norms(a64)
    nb = na if same else _sq_norms(b64)
    n_a, n_b = a64.shape[0], b64.shape[0]
    if float32:
        dist = np.empty((n_a, n_b), dtype=np.float32)
        for start in range(0, n_a, chunk):
            stop = min(start + chunk, n_a)
            dist[start:stop] = _squared_distances(a64[start:stop], b64, na[start:stop], nb)
        np.maximum(dist, 0, out=dist)
        if same:
            np.fill_diagonal(dist, 0)
        return np.sqrt(dist, out=dist).mean()
    total = 0.0
    for start in range(0, n_a, chunk):
        stop = min(start + chunk, n_a)
        d2 = _squared_distances(a64[start:stop], b64, na[start:stop], nb)
        np.maximum(d2, 0.0, out=d2)
        if same:
            rows = np.arange(stop - start)
            d2[rows, rows + start] = 0.0
        total += float(np.sqrt(d2).sum())
    return total / (n_a * n_b)


def energy_distance(cells, control_cells, control_spread=None):
    """Energy distance ``2 E|x - y| - E|x - x'| - E|y - y'|`` between two cell sets.

    ``control_spread`` is ``mean_pairwise_distance(control_cells)``, reusable across
    perturbations. Evaluated in float32 arithmetic for float32 cells, as in cell-eval.
    """
    if control_spread is None:
        control_spread = mean_pairwise_distance(control_cells)
    return 2 * mean_pairwise_distance(cells, control_cells) - mean_pairwise_distance(cells) - control_spread


def energy_distances(
    perturbations: Iterable[str],
    cells: Callable[[str], Any],
    control_cells: Any,
) -> np.ndarray:
    """Energy distance of every perturbation to the controls within one dataset.

    ``cells(p)`` returns the cells (rows: cells, dense or CSR) of perturbation ``p``; only one
    perturbation block is held at a time, so a pipeline can stream blocks from disk.
    """
    spread = mean_pairwise_distance(control_cells)
    return np.array([energy_distance(cells(p), control_cells, spread) for p in perturbations], dtype=np.float64)


def _energy_from_anndata(X_real, X_pred, labels_real, labels_pred, perts, control) -> EnergyDistances:
    out = {}
    for name, X, labels in (("real", X_real, labels_real), ("pred", X_pred, labels_pred)):
        out[name] = energy_distances(
            perts,
            lambda p, X=X, labels=labels: as_rows(X, np.flatnonzero(labels == p)),
            as_rows(X, np.flatnonzero(labels == control)),
        )
    return EnergyDistances(real=out["real"], pred=out["pred"])
