"""The ``linear`` baseline: ridge regression of perturbation effects on perturbation and context features."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.spec import split_combo
from vcell.errors import VcellError, preview
from vcell.predictors.pseudobulk import PseudobulkBaseline, TrainingStats

log = logging.getLogger("vcell.predictors.baselines")

#: Ridge penalties tried by the ``linear`` baseline's cross-validation.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))


def _embedding_table(gene_embeddings) -> tuple[dict[str, np.ndarray], int]:
    """A ``{gene: float64 vector}`` dict and its dimension from a mapping or a DataFrame."""
    if isinstance(gene_embeddings, pd.DataFrame):
        items = {str(g): row for g, row in zip(gene_embeddings.index, gene_embeddings.to_numpy())}
    elif isinstance(gene_embeddings, Mapping):
        items = {str(g): v for g, v in gene_embeddings.items()}
    else:
        kind = type(gene_embeddings).__name__
        raise VcellError(f"gene_embeddings must be a {{gene: vector}} mapping or a genes x dim DataFrame, got {kind}")
    if not items:
        raise VcellError("gene_embeddings is empty")
    table, dim = {}, None
    for gene, vec in items.items():
        try:
            arr = np.asarray(vec, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise VcellError(f"gene_embeddings[{gene!r}] is not a numeric vector") from None
        if dim is None:
            dim = arr.size
        if arr.size != dim or dim == 0:
            raise VcellError(f"gene_embeddings[{gene!r}] has {arr.size} values; expected {dim} like the others")
        if not np.all(np.isfinite(arr)):
            raise VcellError(f"gene_embeddings[{gene!r}] has NaN or infinite values")
        table[gene] = arr
    scale = np.mean([np.linalg.norm(v) for v in table.values()])
    if scale > 0:  # mean norm 1, comparable to a one-hot column
        table = {g: v / scale for g, v in table.items()}
    return table, int(dim)


def _ridge_fit(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Closed-form multi-output ridge with an unpenalised intercept, one fit per alpha.

    Returns ``(W, b)`` per alpha with ``Y ~ X @ W + b``.
    """
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    Xc = X - x_mean
    if Xc.shape[1] == 0:
        return [(np.zeros((0, Y.shape[1])), y_mean) for _ in alphas]
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    UtY = U.T @ (Y - y_mean)
    out = []
    for alpha in alphas:
        W = Vt.T @ ((s / (s**2 + alpha))[:, None] * UtY)
        out.append((W, y_mean - x_mean @ W))
    return out


class LinearBaseline(PseudobulkBaseline):
    """Ridge regression of (context, perturbation) effects on perturbation and context features.

    Features of a perturbation ``"A+B"``: the multi-hot of its target genes over the training
    targets (additive: A+B is the sum of A's and B's columns), optionally the sum of its
    targets' gene embeddings (scaled to mean norm 1), and the one-hot of the context. The
    intercept is not penalised; alpha is chosen from ``alphas`` by seeded K-fold
    cross-validation over the training groups (mean squared error of held-out effects), then
    the model is refitted on all groups.

    A context unseen in training gets the mean of the context coefficients; as the unpenalised
    intercept absorbs whatever the contexts share, the fitted context coefficients sum to zero,
    so this is no context-specific term at all. A target gene
    unseen in training (and absent from the embeddings) contributes nothing, so a perturbation
    of only unseen genes is predicted as intercept + context term.

    Parameters
    ----------
    alphas
        Ridge penalties to cross-validate.
    alpha
        A fixed penalty (skips cross-validation).
    n_folds
        Folds of the cross-validation (fewer if there are fewer training groups).
    gene_embeddings
        Optional ``{gene: vector}`` mapping or genes x dim DataFrame.
    use_onehot
        Use the target multi-hot (default); ``False`` needs ``gene_embeddings``.
    seed
        Seed of the fold assignment.
    """

    name = "linear"

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        alpha: float | None = None,
        n_folds: int = 5,
        gene_embeddings: Mapping[str, Sequence[float]] | pd.DataFrame | None = None,
        use_onehot: bool = True,
        seed: int = 0,
    ):
        super().__init__(seed)
        self.alphas = tuple(float(a) for a in alphas)
        if not self.alphas or any(not np.isfinite(a) or a < 0 for a in self.alphas):
            raise VcellError(f"linear: alphas must be non-negative numbers, got {alphas!r}")
        if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
            raise VcellError(f"linear: alpha must be a non-negative number, got {alpha!r}")
        self.alpha = alpha
        if int(n_folds) < 2:
            raise VcellError(f"linear: n_folds must be >= 2, got {n_folds}")
        self.n_folds = int(n_folds)
        self.use_onehot = bool(use_onehot)
        self.embeddings, self.embedding_dim = (None, 0) if gene_embeddings is None else _embedding_table(gene_embeddings)
        if not self.use_onehot and self.embeddings is None:
            raise VcellError("linear: use_onehot=False needs gene_embeddings")

    # features -----------------------------------------------------------------------------
    def _pert_features(self, label: str) -> tuple[np.ndarray, list[str]]:
        """Perturbation features of ``label`` and its targets that have no feature."""
        x = np.zeros(self.n_pert_features_)
        unknown = []
        for gene in split_combo(label):
            known = False
            if self.use_onehot and gene in self.target_pos_:
                x[self.target_pos_[gene]] += 1.0
                known = True
            if self.embeddings is not None and gene in self.embeddings:
                x[len(self.targets_) :] += self.embeddings[gene]
                known = True
            if not known:
                unknown.append(gene)
        return x, unknown

    def _context_features(self, context: str) -> np.ndarray:
        x = np.zeros(len(self.contexts_))
        i = self.contexts_.get_indexer([str(context)])[0]
        if i >= 0:
            x[i] = 1.0
        elif len(x):
            x[:] = 1.0 / len(x)  # unseen context: the mean context coefficient
        return x

    def _fit(self, stats: TrainingStats) -> None:
        g = stats.groups
        labels = g["perturbation"].tolist()
        targets = sorted({t for lab in labels for t in split_combo(lab)}) if self.use_onehot else []
        self.targets_ = pd.Index(targets)
        self.target_pos_ = {t: i for i, t in enumerate(targets)}
        self.n_pert_features_ = len(targets) + self.embedding_dim
        contexts = sorted(set(g["context"]))
        self.contexts_ = pd.Index(contexts if len(contexts) > 1 else [])  # one context: the intercept
        X = np.array([np.concatenate([self._pert_features(lab)[0], self._context_features(ctx)]) for lab, ctx in zip(labels, g["context"])])
        X = X.reshape(len(labels), self.n_pert_features_ + len(self.contexts_))
        Y = stats.effects
        self.alpha_, self.cv_scores_ = self._choose_alpha(X, Y)
        (self.coef_, self.intercept_), = _ridge_fit(X, Y, [self.alpha_])
        log.info("linear: %d groups, %d features, alpha=%g", len(labels), X.shape[1], self.alpha_)

    def _choose_alpha(self, X: np.ndarray, Y: np.ndarray) -> tuple[float, pd.DataFrame]:
        if self.alpha is not None:
            return float(self.alpha), pd.DataFrame({"alpha": [float(self.alpha)], "cv_mse": [np.nan]})
        n = len(X)
        k = min(self.n_folds, n)
        if k < 2:
            alpha = 1.0 if 1.0 in self.alphas else self.alphas[len(self.alphas) // 2]
            log.info("linear: only %d training group(s); no cross-validation, alpha=%g", n, alpha)
            return alpha, pd.DataFrame({"alpha": [alpha], "cv_mse": [np.nan]})
        folds = np.array_split(np.random.default_rng(self.seed).permutation(n), k)
        sse = np.zeros(len(self.alphas))
        for held in folds:
            keep = np.setdiff1d(np.arange(n), held)
            for j, (W, b) in enumerate(_ridge_fit(X[keep], Y[keep], self.alphas)):
                sse[j] += np.sum((X[held] @ W + b - Y[held]) ** 2)
        mse = sse / Y.size
        scores = pd.DataFrame({"alpha": self.alphas, "cv_mse": mse})
        return float(self.alphas[int(np.argmin(mse))]), scores

    # prediction ---------------------------------------------------------------------------
    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """Intercept + context term + the perturbation's feature terms (0 for controls)."""
        self._fitted_genes()
        ctx = self._context_features(context)
        if len(self.contexts_) and self.contexts_.get_indexer([str(context)])[0] < 0:
            log.info("linear: context %r unseen in training; using the mean context coefficient", context)
        rows, unknown, featureless = [], set(), []
        for p in perturbations:
            if self._is_control(p):
                rows.append(np.zeros(len(self.intercept_)))
                continue
            x, missing = self._pert_features(str(p))
            unknown.update(missing)
            if len(missing) == len(split_combo(str(p))):
                featureless.append(str(p))
            rows.append(np.concatenate([x, ctx]) @ self.coef_ + self.intercept_)
        if unknown:
            log.info("linear: target gene(s) unseen in training contribute nothing: %s", preview(sorted(unknown), n=10, quote=False))
        if featureless:
            log.info("linear: %d perturbation(s) predicted as intercept + context term only: %s", len(featureless), preview(featureless, n=10, quote=False))
        self.featureless_ = featureless
        return self._shifts(controls, perturbations, rows)
