"""The baseline end of the VCC 2026 scale: the context's mean perturbation response.

The generic profile is the equal-weight mean, over the reference's perturbations, of each
perturbation's mean count vector; at a perturbation's own target gene that perturbation is left
out of the mean (a knockdown is not a generic response). The baseline prediction gives every
perturbation this profile, with the reference's cell count and cell-to-cell spread: each
predicted cell is a reference control cell drawn at random (``numpy.random.default_rng(seed)``,
perturbations in sorted order, seed 0 as cell-eval2) with every gene scaled by
``profile / control mean`` and stored as float32, the procedure of ``cell-eval2 baseline``. It
is then scored as an ordinary prediction.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from vcell.errors import VcellError
from vcell.eval.vcc2026.evaluate import Reference
from vcell.eval.vcc2026.inputs import CountsCells

#: cell-eval2's default seed of the baseline's control draws.
BASELINE_SEED = 0
_CHUNK = 1 << 22


def _mean_counts(X: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Mean count of each gene over ``rows`` as scipy computes it (sum of ``x * (1 / n)`` in row order)."""
    sub = X[np.asarray(rows)]
    sub = sp.csr_matrix((sub.data.astype(np.float64) * (1.0 / len(rows)), sub.indices, sub.indptr), shape=sub.shape)
    return np.asarray(sub.sum(axis=0)).ravel()


def generic_profile(real: CountsCells, ref: Reference) -> np.ndarray:
    """The mean perturbation response of the reference (counts per cell, per gene)."""
    perts = ref.perturbations
    total = np.zeros(real.X.shape[1], np.float64)
    means = []
    for p in perts:
        m = _mean_counts(real.X, real.rows(p))
        means.append(m)
        total += m
    count = np.full(total.size, float(len(perts)))
    for m, col in zip(means, ref.targets, strict=True):
        if col >= 0:
            total[col] -= m[col]
            count[col] -= 1.0
    if (count <= 0).any():
        gene = real.genes[int(np.flatnonzero(count <= 0)[0])]
        raise VcellError(f"{real.where}: gene {gene!r} is the target of every perturbation; the mean response has no value there")
    return total / count


def baseline_cells(real: CountsCells, ref: Reference, seed: int = BASELINE_SEED) -> CountsCells:
    """The baseline prediction: reference control cells scaled to the generic profile."""
    return emit_baseline(generic_profile(real, ref), ref, {p: real.rows(p).size for p in ref.perturbations}, seed)


def emit_baseline(profile: np.ndarray, ref: Reference, sizes: dict[str, int], seed: int = BASELINE_SEED) -> CountsCells:
    """The baseline prediction from its profile: ``sizes[p]`` control cells drawn for each
    perturbation ``p`` and scaled gene by gene to the profile (the reference matrix is not needed)."""
    ctrl = ref.ctrl.cells
    ctrl_mean = _mean_counts(ctrl.X, np.arange(ctrl.X.shape[0]))
    zero = ctrl_mean <= 0
    scale = np.where(zero, 0.0, profile / np.where(zero, 1.0, ctrl_mean))
    rng = np.random.default_rng(seed)
    draws, labels = [], []
    for p in sorted(ref.perturbations):
        n = sizes[p]
        draws.append(rng.integers(0, ctrl.X.shape[0], size=n))
        labels.extend([p] * n)
    src = np.concatenate(draws).astype(np.intp)
    X = ctrl.X[src]
    data = X.data.astype(np.float32, copy=False) if X.data.dtype == np.float32 else X.data.astype(np.float32)
    for s in range(0, data.size, _CHUNK):  # in place, by chunks: no temporary the size of the matrix
        e = min(data.size, s + _CHUNK)
        data[s:e] = (data[s:e] * scale[X.indices[s:e]]).astype(np.float32)  # float32 x float64, rounded to float32
    X = sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape)
    X.eliminate_zeros()
    return CountsCells(X, np.asarray(labels, dtype=object), ref.genes, "the mean-response baseline")
