"""The ``kernel_ridge`` baseline: kernel ridge regression of pseudobulk effects on perturbation features.

One of the strongest simple learners for perturbations never seen in training: a perturbation's
effect is a kernel-weighted combination of the training perturbations' effects, weighted by how
close their feature vectors (``pert_features``: a gene table) are. Closed form: one
eigendecomposition of the kernel matrix per kernel width, every penalty from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.errors import VcellError, preview
from vcell.predictors.linear import _folds, _penalties, encode_pert_features, fit_pert_features, warn_at_largest_penalty
from vcell.predictors.pseudobulk import PseudobulkBaseline, TrainingStats

log = logging.getLogger("vcell.predictors.baselines")

#: Ridge penalties tried by the cross-validation (the kernel's diagonal is 1).
DEFAULT_KRR_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 2, 11))
#: RBF widths tried, as multiples of 1 / (median squared distance between training perturbation vectors).
DEFAULT_GAMMAS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
KERNELS = ("rbf", "cosine")


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d2 = (A * A).sum(axis=1)[:, None] + (B * B).sum(axis=1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d2, 0.0)


def kernel_matrix(A: np.ndarray, B: np.ndarray, kernel: str, gamma: float | None = None) -> np.ndarray:
    """``[len(A), len(B)]``: ``exp(-gamma |a - b|^2)`` (``rbf``) or ``a.b / (|a| |b|)`` (``cosine``; 0 for a zero vector)."""
    if kernel == "cosine":
        na, nb = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=1)
        return (A / np.where(na > 0, na, 1.0)[:, None]) @ (B / np.where(nb > 0, nb, 1.0)[:, None]).T
    return np.exp(-float(gamma) * _sq_dists(A, B))


def _means(codes: np.ndarray, Y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-code means of ``Y``'s rows ``[n, genes]`` (0 where a code has no row) and the row counts."""
    ind = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    counts = np.bincount(codes, minlength=n).astype(np.float64)
    return np.asarray(ind @ Y) / np.maximum(counts, 1.0)[:, None], counts


def _targets(ctx: np.ndarray, pert: np.ndarray, Y: np.ndarray, n_ctx: int, train: np.ndarray):
    """What the kernel term fits, from the groups of the perturbations ``train`` (indices).

    Returns the context means ``[n_ctx, genes]`` (a context without such groups: the mean of the
    others), the offset (mean residual) and the centred residual per training perturbation.
    """
    pos = np.full(pert.max() + 1, -1)
    pos[train] = np.arange(len(train))
    sel = pos[pert] >= 0
    means, counts = _means(ctx[sel], Y[sel], n_ctx)
    means[counts == 0] = means[counts > 0].mean(axis=0)
    R, _ = _means(pos[pert[sel]], Y[sel] - means[ctx[sel]], len(train))
    offset = R.mean(axis=0)
    return means, offset, R - offset


class KernelRidgeBaseline(PseudobulkBaseline):
    """Kernel ridge regression of pseudobulk effects on perturbation features.

    Fits the training (context, perturbation) effects (as ``linear``) in two parts. The context
    part is each context's mean effect (``context_mean``'s); the kernel part is kernel ridge
    regression of what is left, averaged per perturbation over its training contexts (one row
    per perturbation label), on the perturbation's vector from ``pert_features``
    (:mod:`vcell.features.perturbations`; ``"A+B"`` is the sum of A's and B's rows), with an
    unpenalised offset. A perturbation is predicted as context mean + offset + kernel term; a
    context unseen in training gets the mean of the training contexts' means (each context one
    vote); controls get no shift.

    The kernel is ``rbf`` (``exp(-gamma |x - x'|^2)``, gamma relative to the median squared
    distance between the training perturbation vectors) or ``cosine``. alpha (and gamma for
    ``rbf``) are chosen on a grid by seeded K-fold cross-validation over the training
    perturbation labels (a label is never in training and validation at once; the context
    means are recomputed in each fold; mean squared error of the held-out groups' effects),
    then the model is refitted on all perturbations.

    Targets without a vector: with ``pert_features="onehot"`` (allowed, but then an unseen
    target is orthogonal to every training one and a table is what makes this model useful) a
    target unseen in training contributes nothing (logged), and a perturbation of only unseen
    targets gets no kernel term: context mean + offset, the role of ``pert_mean``'s global-mean
    fallback. With a gene table, a target absent from every source is an error naming it,
    raised before any prediction work (and, for a training target, at fit time unless
    ``onehot`` is one of the sources).

    Parameters
    ----------
    kernel
        ``"rbf"`` (default) or ``"cosine"``.
    pert_features
        ``"onehot"`` (the default), a gene table file, ``"onehot,FILE"``, a
        :class:`~vcell.features.genes.GeneEmbeddings` table or a list of these.
    alphas
        Ridge penalties to cross-validate.
    gammas
        RBF widths to cross-validate, in units of 1 / median squared distance.
    alpha, gamma
        Fixed values (skip cross-validation over that parameter; ``gamma`` in the same units).
    n_folds
        Folds of the cross-validation (fewer if there are fewer training perturbations).
    seed
        Seed of the fold assignment.
    """

    name = "kernel_ridge"

    def __init__(
        self,
        kernel: str = "rbf",
        pert_features="onehot",
        alphas: Sequence[float] = DEFAULT_KRR_ALPHAS,
        gammas: Sequence[float] = DEFAULT_GAMMAS,
        alpha: float | None = None,
        gamma: float | None = None,
        n_folds: int = 5,
        seed: int = 0,
    ):
        super().__init__(seed)
        if kernel not in KERNELS:
            raise VcellError(f"{self.name}: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.alphas = _penalties(self.name, "alphas", alphas) if alpha is None else _penalties(self.name, "alpha", [alpha])
        self.gammas = _penalties(self.name, "gammas", gammas) if gamma is None else _penalties(self.name, "gamma", [gamma])
        for option, values, given in (("alpha", self.alphas, alphas if alpha is None else alpha), ("gamma", self.gammas, gammas if gamma is None else gamma)):
            if 0.0 in values:  # the kernel matrix can be singular: a zero penalty is no solution
                raise VcellError(f"{self.name}: {option} must be positive, got {given!r}")
        self.alpha, self.gamma = alpha, gamma
        self.n_folds = _folds(self.name, n_folds)
        from vcell.features.perturbations import check_sources  # torch only when a model is built

        check_sources(pert_features, self.name, read=False)
        self.pert_features = pert_features

    # fitting ------------------------------------------------------------------------------
    def _fit(self, stats: TrainingStats) -> None:
        g = stats.groups
        ctx, contexts = pd.factorize(g["context"], sort=True)
        pert, perts = pd.factorize(g["perturbation"], sort=True)
        self.features_ = fit_pert_features(self.name, self.pert_features, list(perts))
        X, _, _ = encode_pert_features(self.name, self.features_, list(perts), str(self._spec.control))
        d2 = _sq_dists(X, X)[np.triu_indices(len(X), k=1)]
        self.median_sq_dist_ = float(np.median(d2[d2 > 0])) if (d2 > 0).any() else 1.0
        Y = stats.effects
        self.gamma_, self.alpha_, self.cv_scores_ = self._choose(X, Y, ctx, pert, len(contexts))
        warn_at_largest_penalty(self.name, self.alpha_, self.alphas, self.cv_scores_)
        means, self.offset_, R = _targets(ctx, pert, Y, len(contexts), np.arange(len(perts)))
        w, V = np.linalg.eigh(self._kernel(X, X))
        self.dual_coef_ = V @ ((V.T @ R) / (np.maximum(w, 0.0) + self.alpha_)[:, None])
        self.train_x_, self.perturbations_ = X, pd.Index(perts.astype(str))
        self.contexts_, self.context_effects_ = pd.Index(contexts.astype(str)), means
        gamma = "" if self.kernel == "cosine" else f", gamma={self.gamma_:g}/median sq. distance"
        log.info("kernel_ridge: %d perturbations in %d contexts, %s kernel on %s%s, alpha=%g",
                 len(perts), len(contexts), self.kernel, ", ".join(self.features_.sources), gamma, self.alpha_)

    def _kernel(self, A: np.ndarray, B: np.ndarray, gamma: float | None = None) -> np.ndarray:
        """The kernel at relative width ``gamma`` (default: the chosen one)."""
        if self.kernel == "cosine":
            return kernel_matrix(A, B, "cosine")
        return kernel_matrix(A, B, "rbf", (self.gamma_ if gamma is None else gamma) / self.median_sq_dist_)

    def _choose(self, X, Y, ctx, pert, n_ctx) -> tuple[float | None, float, pd.DataFrame]:
        """``(gamma, alpha, scores)``: the grid point of least cross-validated MSE (first one on ties)."""
        gammas = [None] if self.kernel == "cosine" else list(self.gammas)
        grid = pd.DataFrame([(gm, a) for gm in gammas for a in self.alphas], columns=["gamma", "alpha"])
        n = len(X)
        k = min(self.n_folds, n)
        if len(grid) == 1 or k < 2:
            if len(grid) > 1:
                log.info("kernel_ridge: only %d training perturbation(s); no cross-validation", n)
            gamma = gammas[len(gammas) // 2]
            alpha = 1.0 if 1.0 in self.alphas else self.alphas[len(self.alphas) // 2]
            return gamma, alpha, pd.DataFrame({"gamma": [gamma], "alpha": [alpha], "cv_mse": [np.nan]})
        folds = np.array_split(np.random.default_rng(self.seed).permutation(n), k)
        sse = np.zeros((len(gammas), len(self.alphas)))
        for held in map(np.sort, folds):
            keep = np.setdiff1d(np.arange(n), held)
            means, offset, R = _targets(ctx, pert, Y, n_ctx, keep)
            rows = np.flatnonzero(np.isin(pert, held))  # the held-out perturbations' groups
            err = Y[rows] - means[ctx[rows]] - offset
            at = np.searchsorted(held, pert[rows])
            for i, gm in enumerate(gammas):
                w, V = np.linalg.eigh(self._kernel(X[keep], X[keep], gm))
                KV, VtR = self._kernel(X[held], X[keep], gm) @ V, V.T @ R
                for j, a in enumerate(self.alphas):
                    term = (KV / (np.maximum(w, 0.0) + a)) @ VtR
                    sse[i, j] += np.sum((err - term[at]) ** 2)
        grid["cv_mse"] = sse.ravel() / Y.size
        i, j = np.unravel_index(int(np.argmin(sse)), sse.shape)
        return gammas[i], self.alphas[j], grid

    # prediction ---------------------------------------------------------------------------
    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """Context mean + offset + kernel term per perturbation (0 for controls)."""
        self._fitted_genes()
        X, unknown, featureless = encode_pert_features(self.name, self.features_, perturbations, str(self._spec.control))
        i = self.contexts_.get_indexer([str(context)])[0]
        if i < 0:
            log.info("kernel_ridge: context %r unseen in training; using the mean of the training contexts' mean effects", context)
        base = self.context_effects_[i] if i >= 0 else self.context_effects_.mean(axis=0)
        term = self._kernel(X, self.train_x_) @ self.dual_coef_
        lost = set(featureless)
        rows = [np.zeros_like(base) if self._is_control(p) else base + self.offset_ + (0.0 if str(p) in lost else t)
                for p, t in zip(perturbations, term)]
        if unknown:
            log.info("kernel_ridge: target gene(s) unseen in training contribute nothing: %s", preview(unknown, n=10, quote=False))
        if featureless:
            log.info("kernel_ridge: %d perturbation(s) without features predicted as context mean + offset: %s",
                     len(featureless), preview(featureless, n=10, quote=False))
        self.featureless_ = featureless
        return self._shifts(controls, perturbations, rows)
