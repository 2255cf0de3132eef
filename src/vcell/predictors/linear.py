"""The ``linear`` baseline: ridge regression of perturbation effects on perturbation and context features.

Also the perturbation-feature helpers the feature-based baselines share (``linear``,
``kernel_ridge``): a ``pert_features`` value (:mod:`vcell.features.perturbations`) is checked
when the model is built, resolved on the training targets at fit time, and encoded at prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.spec import split_combo
from vcell.errors import VcellError, preview
from vcell.predictors.pseudobulk import PseudobulkBaseline, TrainingStats

log = logging.getLogger("vcell.predictors.baselines")

#: Ridge penalties tried by the ``linear`` baseline's cross-validation.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))


# --------------------------------------------------------------------------------------------
# Perturbation features (shared with kernel_ridge)


def fit_pert_features(name: str, spec, labels: Sequence[str]):
    """The :class:`~vcell.features.perturbations.PertFeatures` of a model trained on ``labels``.

    One-hot columns are the training targets (sorted). With a table and no ``onehot`` source,
    a training target absent from the table is an error naming it (never a zero vector).
    """
    from vcell.features.perturbations import PertFeatures

    targets = sorted({t for lab in labels for t in split_combo(str(lab))})
    features = PertFeatures.build(spec, targets)
    try:
        features.check(labels, what="training perturbation")
    except VcellError as exc:
        raise VcellError(f"{name}: {exc}; add 'onehot' (pert_features 'onehot,FILE') to give such targets their own column") from None
    return features


def encode_pert_features(name: str, features, labels: Sequence[str], control: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Feature rows ``[len(labels), dim]`` (float64; ``"A+B"`` is the sum of A's and B's rows, a control 0).

    With a table, a target without a vector raises one :class:`VcellError` line naming it,
    before any work. With one-hot features only, a target unseen in training contributes
    nothing. Also returns the targets without a vector and the labels left with none at all.
    """
    labels = [str(p) for p in labels]
    if not features.is_onehot:
        try:
            features.check(labels, control)
        except VcellError as exc:
            raise VcellError(f"{name}: {exc}") from None
        return features.encode(labels, control).double().numpy(), [], []
    unknown = features.missing(labels, control)
    X = np.zeros((len(labels), features.dim))
    featureless = []
    for i, label in enumerate(labels):
        if label == control:
            continue
        known = [t for t in split_combo(label) if t in features]
        if known:
            X[i] = features.encode(known).double().numpy().sum(axis=0)
        else:
            featureless.append(label)
    return X, unknown, featureless


# --------------------------------------------------------------------------------------------
# The linear baseline


def _penalties(name: str, option: str, values) -> tuple[float, ...]:
    """``values`` as a tuple of non-negative floats, else one error line."""
    try:
        if isinstance(values, str):
            raise TypeError
        out = tuple(float(a) for a in ([values] if isinstance(values, (int, float)) else values))
    except (TypeError, ValueError):
        out = ()
    if not out or any(not np.isfinite(a) or a < 0 for a in out):
        raise VcellError(f"{name}: {option} must be non-negative numbers, got {values!r}")
    return out


def _folds(name: str, n_folds) -> int:
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise VcellError(f"{name}: n_folds must be an integer >= 2, got {n_folds!r}")
    return int(n_folds)


def warn_at_largest_penalty(name: str, alpha: float, alphas: Sequence[float], scores: pd.DataFrame) -> None:
    """Warn when cross-validation chose the largest penalty of the grid: the model is then about the
    training perturbations' mean effect, whatever its features (it reads as another model in a table)."""
    if len(alphas) > 1 and alpha == max(alphas) and scores["cv_mse"].notna().any():
        log.warning("%s: cross-validation chose the largest penalty of its grid (alpha=%g): the perturbation features add "
                    "nothing it could measure, so it predicts about the training perturbations' mean effect, as pert_mean "
                    "does for an unseen one (larger alphas would shrink it further)", name, alpha)


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

    Features of a (context, perturbation) group: the perturbation's vector from
    ``pert_features`` (:mod:`vcell.features.perturbations`; ``"A+B"`` is the sum of A's and B's
    rows, so with one-hot features the multi-hot of its targets) followed by the one-hot of the
    context. The intercept is not penalised; alpha is chosen from ``alphas`` by seeded K-fold
    cross-validation (mean squared error of held-out effects), then the model is refitted on all
    groups. The folds hold out groups with one-hot features alone (what such a model predicts is
    a seen perturbation in another context), and perturbation labels, each with all its groups,
    as soon as a gene table is among them (what the table is for is a perturbation never seen:
    folds of groups let a held-out group's label be learnt from its other contexts, which chose
    too small a penalty for it; as ``kernel_ridge`` does).

    A context unseen in training gets the mean of the context coefficients; as the unpenalised
    intercept absorbs whatever the contexts share, the fitted context coefficients sum to zero,
    so this is no context-specific term at all.

    Targets without a vector: with ``pert_features="onehot"`` a target unseen in training
    contributes nothing (logged), so a perturbation of only unseen targets is predicted as
    intercept + context term (the role of ``pert_mean``'s global-mean fallback). As soon as a
    gene table is given, a target absent from every source is an error naming it, raised
    before any prediction work (and, for a training target, at fit time unless ``onehot`` is
    one of the sources).

    Parameters
    ----------
    alphas
        Ridge penalties to cross-validate.
    alpha
        A fixed penalty (skips cross-validation).
    n_folds
        Folds of the cross-validation (fewer if there are fewer training groups).
    pert_features
        ``"onehot"`` (the default), a gene table file, ``"onehot,FILE"``, a
        :class:`~vcell.features.genes.GeneEmbeddings` table or a list of these, resolved on the
        training targets at fit time (:meth:`~vcell.features.perturbations.PertFeatures.build`).
    seed
        Seed of the fold assignment.
    """

    name = "linear"

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        alpha: float | None = None,
        n_folds: int = 5,
        pert_features="onehot",
        seed: int = 0,
    ):
        super().__init__(seed)
        self.alphas = _penalties(self.name, "alphas", alphas)
        if alpha is not None:
            alpha = _penalties(self.name, "alpha", [alpha])[0]
        self.alpha = alpha
        self.n_folds = _folds(self.name, n_folds)
        from vcell.features.perturbations import check_sources  # torch only when a model is built

        check_sources(pert_features, self.name, read=False)
        self.pert_features = pert_features

    # features -----------------------------------------------------------------------------
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
        self.features_ = fit_pert_features(self.name, self.pert_features, labels)
        contexts = sorted(set(g["context"]))
        self.contexts_ = pd.Index(contexts if len(contexts) > 1 else [])  # one context: the intercept
        P, _, _ = encode_pert_features(self.name, self.features_, labels, str(self._spec.control))
        X = np.hstack([P, np.array([self._context_features(c) for c in g["context"]]).reshape(len(labels), len(self.contexts_))])
        Y = stats.effects
        by_label = None if self.features_.is_onehot else pd.factorize(pd.Series(labels))[0]
        self.alpha_, self.cv_scores_ = self._choose_alpha(X, Y, by_label)
        warn_at_largest_penalty(self.name, self.alpha_, self.alphas, self.cv_scores_)
        (self.coef_, self.intercept_), = _ridge_fit(X, Y, [self.alpha_])
        log.info("linear: %d groups, %d features (%s), alpha=%g", len(labels), X.shape[1], ", ".join(self.features_.sources), self.alpha_)

    def _choose_alpha(self, X: np.ndarray, Y: np.ndarray, by_label: np.ndarray | None = None) -> tuple[float, pd.DataFrame]:
        """The penalty of least cross-validated error; ``by_label`` (each group's label code): folds of labels."""
        if self.alpha is not None:
            return float(self.alpha), pd.DataFrame({"alpha": [float(self.alpha)], "cv_mse": [np.nan]})
        units = np.arange(len(X)) if by_label is None else by_label  # what a fold holds out: groups, or labels
        n = int(units.max()) + 1 if len(units) else 0
        k = min(self.n_folds, n)
        if k < 2:
            alpha = 1.0 if 1.0 in self.alphas else self.alphas[len(self.alphas) // 2]
            log.info("linear: only %d training %s; no cross-validation, alpha=%g", n,
                     "group(s)" if by_label is None else "perturbation(s)", alpha)
            return alpha, pd.DataFrame({"alpha": [alpha], "cv_mse": [np.nan]})
        folds = np.array_split(np.random.default_rng(self.seed).permutation(n), k)
        sse = np.zeros(len(self.alphas))
        for fold in folds:
            held = np.flatnonzero(np.isin(units, fold))
            keep = np.setdiff1d(np.arange(len(X)), held)
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
        control = str(self._spec.control)
        P, unknown, featureless = encode_pert_features(self.name, self.features_, perturbations, control)
        rows = [np.zeros(len(self.intercept_)) if self._is_control(p) else np.concatenate([x, ctx]) @ self.coef_ + self.intercept_
                for p, x in zip(perturbations, P)]
        if unknown:
            log.info("linear: target gene(s) unseen in training contribute nothing: %s", preview(unknown, n=10, quote=False))
        if featureless:
            log.info("linear: %d perturbation(s) predicted as intercept + context term only: %s", len(featureless), preview(featureless, n=10, quote=False))
        self.featureless_ = featureless
        return self._shifts(controls, perturbations, rows)
