"""Simple perturbation-response baselines: every model must beat these on the same split.

All baselines work on log1p expression and learn only from the training cells (split role
``train``) and control cells. Their statistics are pseudobulks (per-group mean expression)
computed with sparse indicator products, reading the matrix in row blocks, so a backed
(on-disk) dataset works and the matrix is never densified as a whole.

A perturbation's *effect* in a context is ``pseudobulk(perturbation, context) -
pseudobulk(controls of that context)``, per ``"dataset.context"`` key (each dataset's cells are
compared with that dataset's controls). Contexts are addressed by name (``data.index.contexts``)
at prediction time; effects of keys with the same context name are pooled.

=================  ========================================================================
``control_mean``   no change: the predicted cells are the target context's controls.
``cell_mean``      the VCC baseline: every perturbed cell is one vector, the mean over the
                   training groups' pseudobulks (controls one group), as ``cell-eval``.
``pert_mean``      the perturbation's mean effect over the training contexts that saw it;
                   unseen perturbations get the mean effect of all training perturbations.
``context_mean``   the mean effect of the target context's training perturbations (few-shot);
                   zero-shot contexts fall back to the global mean effect.
``linear``         ridge regression of effects on perturbation features (multi-hot targets,
                   optional gene embeddings) and context one-hot; alpha by seeded K-fold CV.
=================  ========================================================================
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.aggregate import group_sums
from vcell.data.dataset import PerturbationData
from vcell.data.spec import split_combo
from vcell.data.splits import Split
from vcell.errors import VcellError
from vcell.models.base import Predictor, assemble_prediction

log = logging.getLogger(__name__)

#: Ridge penalties tried by the ``linear`` baseline's cross-validation.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))
_MAX_LISTED = 10


# --------------------------------------------------------------------------------------------
# Pseudobulks of the training data


@dataclass
class TrainingStats:
    """Pseudobulks of the training data, the shared input of every baseline.

    Attributes
    ----------
    genes
        The genes (``var_names``) of the data, the columns of every array here.
    groups
        One row per training (context key, perturbation) group: ``dataset``, ``context``,
        ``key`` (``"dataset.context"``), ``perturbation``, ``n_cells``.
    means
        ``[len(groups), genes]`` pseudobulk of each group (float64).
    controls
        One row per context key with control cells: ``dataset``, ``context``, ``key``,
        ``n_cells``, ``trained`` (the key has training groups).
    control_means
        ``[len(controls), genes]`` control pseudobulk of each key (float64).
    """

    genes: pd.Index
    groups: pd.DataFrame
    means: np.ndarray
    controls: pd.DataFrame
    control_means: np.ndarray

    @property
    def effects(self) -> np.ndarray:
        """``[len(groups), genes]``: each group's pseudobulk minus its key's control pseudobulk."""
        row = pd.Index(self.controls["key"]).get_indexer(self.groups["key"])
        return self.means - self.control_means[row]


def _check_inputs(name: str, data: PerturbationData, split: Split) -> None:
    if data.spec.expression == "counts":
        raise VcellError(
            f"{name}: the data holds raw counts; baselines need log1p expression "
            "(run `vcell data preprocess` or pass preprocessed/log1p data)"
        )
    if len(split.role_codes) != data.index.n_cells:
        raise VcellError(f"{name}: the split has {len(split.role_codes)} cells but the data has {data.index.n_cells}")
    if data.index.control_code < 0:
        raise VcellError(f"{name}: control label {data.spec.control!r} not found in column {data.spec.pert_col!r}")


def training_stats(data: PerturbationData, split: Split) -> TrainingStats:
    """Pseudobulks of every training (context key, perturbation) group and every key's controls.

    One pass over the matrix (row blocks; only blocks holding training or control cells are
    read). Training groups whose key has no control cells are dropped (``apply_split`` already
    marks them unused).
    """
    idx = data.index
    keys = idx.context_key_codes.astype(np.int64)
    is_ctrl = idx.is_control
    train = split.mask("train") & ~is_ctrl & (idx.pert_codes >= 0)
    ctrl_keys = np.unique(keys[is_ctrl])
    train &= np.isin(keys, ctrl_keys)
    if not train.any():
        raise VcellError("no training cells: the split gives no perturbed cell the role 'train' in a context with controls")

    n_perts = len(idx.perts)
    combined = keys[train] * n_perts + idx.pert_codes[train]
    group_ids, group_inverse = np.unique(combined, return_inverse=True)
    codes = np.full(idx.n_cells, -1, dtype=np.int64)
    codes[train] = group_inverse
    codes[is_ctrl] = len(group_ids) + np.searchsorted(ctrl_keys, keys[is_ctrl])
    n_groups = len(group_ids) + len(ctrl_keys)

    sums = group_sums(data.adata.X, codes, n_groups)
    sizes = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    means = sums / sizes[:, None]

    n_ctx = len(idx.contexts)
    g_keys, g_perts = group_ids // n_perts, group_ids % n_perts
    groups = pd.DataFrame(
        {
            "dataset": idx.datasets[g_keys // n_ctx].astype(str),
            "context": idx.contexts[g_keys % n_ctx].astype(str),
            "key": idx.context_key_names[g_keys].astype(str),
            "perturbation": idx.perts[g_perts].astype(str),
            "n_cells": sizes[: len(group_ids)].astype(int),
        }
    )
    controls = pd.DataFrame(
        {
            "dataset": idx.datasets[ctrl_keys // n_ctx].astype(str),
            "context": idx.contexts[ctrl_keys % n_ctx].astype(str),
            "key": idx.context_key_names[ctrl_keys].astype(str),
            "n_cells": sizes[len(group_ids) :].astype(int),
        }
    )
    controls["trained"] = controls["key"].isin(set(groups["key"]))
    log.info(
        "training pseudobulks: %d (context, perturbation) groups in %d contexts; controls of %d contexts",
        len(groups),
        groups["key"].nunique(),
        len(controls),
    )
    return TrainingStats(
        genes=pd.Index(data.adata.var_names.astype(str)),
        groups=groups,
        means=means[: len(group_ids)],
        controls=controls,
        control_means=means[len(group_ids) :],
    )


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(map(str, names[:_MAX_LISTED]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------
# Base class of the pseudobulk baselines


class _Baseline(Predictor):
    """Fits :class:`TrainingStats`; subclasses turn them into per-perturbation shifts."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def fit(self, data: PerturbationData, split: Split) -> _Baseline:
        """Compute the training pseudobulks, then the subclass's parameters (:meth:`_fit`)."""
        _check_inputs(self.name, data, split)
        self.spec = data.spec
        self.stats_ = training_stats(data, split)
        self.genes_ = self.stats_.genes
        self._fit(self.stats_)
        return self

    def _fit(self, stats: TrainingStats) -> None:
        """Subclass hook: derive the model's parameters."""

    def _columns(self, controls: ad.AnnData) -> np.ndarray:
        """Positions of the controls' genes among the fitted genes (same genes, any order)."""
        genes = self._fitted_genes()
        names = pd.Index(controls.var_names.astype(str))
        if names.equals(genes):
            return np.arange(len(genes))
        pos = genes.get_indexer(names)
        if len(names) != len(genes) or (pos < 0).any():
            missing = names[pos < 0] if (pos < 0).any() else genes.difference(names)
            raise VcellError(
                f"{self.name}: the control cells' genes differ from the training data's "
                f"({len(names)} vs {len(genes)} genes; e.g. {str(missing[0])!r} is in only one)"
            )
        return pos

    def _fitted_genes(self) -> pd.Index:
        genes = getattr(self, "genes_", None)
        if genes is None:
            raise VcellError(f"{self.name}: predict() called before fit()")
        return genes

    def _shifts(self, controls: ad.AnnData, perturbations: Sequence[str], rows) -> np.ndarray:
        """Stack per-perturbation vectors (fitted gene order) into controls' gene order."""
        cols = self._columns(controls)
        out = np.zeros((len(perturbations), len(cols)), dtype=np.float64)
        for i, vec in enumerate(rows):
            out[i] = vec[cols]
        return out

    def _is_control(self, pert: str) -> bool:
        return str(pert) == str(self._spec.control)


# --------------------------------------------------------------------------------------------
# The baselines


class ControlMean(_Baseline):
    """No change: every perturbation is predicted as the target context's control cells.

    The shift is 0, so the predicted cells are resampled real controls and the predicted
    pseudobulk is the target context's control pseudobulk.
    """

    name = "control_mean"

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """All-zero shifts, ``[len(perturbations), genes]``."""
        cols = self._columns(controls)
        return np.zeros((len(perturbations), len(cols)), dtype=np.float64)


class CellMean(_Baseline):
    """The VCC "cell-mean" baseline: every perturbed cell is the same vector.

    The vector is the mean over the training groups' pseudobulks, as ``cell-eval baseline``
    builds it on the training data: groups are perturbation labels (cells pooled over the
    training contexts) and the controls of the training contexts are one more group.
    :meth:`predict` outputs exactly that vector for each predicted cell (no control noise) and
    appends the real controls.
    """

    name = "cell_mean"

    def _fit(self, stats: TrainingStats) -> None:
        g = stats.groups
        sums = stats.means * g["n_cells"].to_numpy()[:, None]
        pert_codes, perts = pd.factorize(g["perturbation"], sort=True)
        pert_sums = np.zeros((len(perts), sums.shape[1]))
        np.add.at(pert_sums, pert_codes, sums)
        pert_means = pert_sums / np.bincount(pert_codes, weights=g["n_cells"].to_numpy())[:, None]
        trained = stats.controls["trained"].to_numpy()
        n_ctrl = stats.controls["n_cells"].to_numpy()[trained]
        ctrl_mean = (stats.control_means[trained] * n_ctrl[:, None]).sum(axis=0) / n_ctrl.sum()
        self.vector_ = np.vstack([pert_means, ctrl_mean[None, :]]).mean(axis=0)
        log.info("cell_mean: mean of %d training perturbation pseudobulks and the control pseudobulk", len(perts))

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """The baseline vector minus the mean of ``controls`` (the pseudobulk shift it implies)."""
        cols = self._columns(controls)
        basal = np.asarray(controls.X.mean(axis=0), dtype=np.float64).ravel()
        return np.tile(self.vector_[cols] - basal, (len(perturbations), 1))

    def predict(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> ad.AnnData:
        """Each predicted cell is the baseline vector; the real controls are appended."""
        cols = self._columns(controls)
        vec = self.vector_[cols].astype(np.float32)
        cells = {}
        for pert in perturbations:
            n = cells_per_perturbation[pert] if isinstance(cells_per_perturbation, Mapping) else int(cells_per_perturbation)
            cells[pert] = np.tile(vec, (n, 1))
        return assemble_prediction(self._spec, controls, perturbations, context, None, cells_per_perturbation, seed, cells=cells)


class PertMean(_Baseline):
    """Each perturbation's mean effect over the training contexts where it was seen.

    The effect in a context is ``pseudobulk(perturbation, context) - control
    pseudobulk(context)``; the prediction adds the mean (one vote per context) to the target
    context's controls. A perturbation without training cells gets the global mean effect: the
    mean over training perturbations of their mean effects (each perturbation counts once).
    """

    name = "pert_mean"

    def _fit(self, stats: TrainingStats) -> None:
        effects = stats.effects
        codes, perts = pd.factorize(stats.groups["perturbation"], sort=True)
        sums = np.zeros((len(perts), effects.shape[1]))
        np.add.at(sums, codes, effects)
        self.perturbations_ = pd.Index(perts.astype(str))
        self.pert_effects_ = sums / np.bincount(codes)[:, None]
        self.global_effect_ = self.pert_effects_.mean(axis=0)

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """Mean training effect per perturbation (global mean effect if unseen; 0 for controls)."""
        self._fitted_genes()
        pos = self.perturbations_.get_indexer([str(p) for p in perturbations])
        rows, fallback = [], []
        for p, i in zip(perturbations, pos):
            if self._is_control(p):
                rows.append(np.zeros_like(self.global_effect_))
            elif i < 0:
                rows.append(self.global_effect_)
                fallback.append(str(p))
            else:
                rows.append(self.pert_effects_[i])
        if fallback:
            log.info(
                "%s: %d perturbation(s) unseen in training get the mean effect of all training perturbations: %s",
                self.name,
                len(fallback),
                _listing(fallback),
            )
        self.fallback_ = fallback
        return self._shifts(controls, perturbations, rows)


class ContextMean(PertMean):
    """Few-shot: the mean effect of the target context's training perturbations.

    Every perturbation gets the same shift: the mean over the target context's training
    (context, perturbation) groups of their effects. A context without training perturbations
    (zero-shot) falls back to :class:`PertMean`'s global mean effect.
    """

    name = "context_mean"

    def _fit(self, stats: TrainingStats) -> None:
        super()._fit(stats)
        effects = stats.effects
        codes, contexts = pd.factorize(stats.groups["context"], sort=True)
        sums = np.zeros((len(contexts), effects.shape[1]))
        np.add.at(sums, codes, effects)
        self.contexts_ = pd.Index(contexts.astype(str))
        self.context_effects_ = sums / np.bincount(codes)[:, None]

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """The context's mean training effect for every perturbation (0 for controls)."""
        self._fitted_genes()
        i = self.contexts_.get_indexer([str(context)])[0]
        if i < 0:
            log.info("context_mean: context %r has no training perturbations (zero-shot); using the global mean effect", context)
            effect = self.global_effect_
        else:
            effect = self.context_effects_[i]
        self.fallback_ = [] if i >= 0 else [str(p) for p in perturbations]
        rows = [np.zeros_like(effect) if self._is_control(p) else effect for p in perturbations]
        return self._shifts(controls, perturbations, rows)


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


class LinearBaseline(_Baseline):
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
            log.info("linear: target gene(s) unseen in training contribute nothing: %s", _listing(sorted(unknown)))
        if featureless:
            log.info("linear: %d perturbation(s) predicted as intercept + context term only: %s", len(featureless), _listing(featureless))
        self.featureless_ = featureless
        return self._shifts(controls, perturbations, rows)


# --------------------------------------------------------------------------------------------
# Registry

BASELINES: dict[str, type[Predictor]] = {
    ControlMean.name: ControlMean,
    CellMean.name: CellMean,
    PertMean.name: PertMean,
    ContextMean.name: ContextMean,
    LinearBaseline.name: LinearBaseline,
}


def make_baseline(name: str, **options) -> Predictor:
    """A fresh, unfitted baseline by name (``options`` go to its constructor)."""
    if name not in BASELINES:
        close = difflib.get_close_matches(str(name), list(BASELINES), n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise VcellError(f"unknown baseline {name!r}{hint} (baselines: {', '.join(BASELINES)})")
    cls = BASELINES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(options) - set(accepted))
    if bad:
        raise VcellError(f"baseline {name!r} has no option {bad[0]!r} (options: {', '.join(accepted)})")
    return cls(**options)


__all__ = [
    "BASELINES",
    "DEFAULT_ALPHAS",
    "CellMean",
    "ContextMean",
    "ControlMean",
    "LinearBaseline",
    "PertMean",
    "TrainingStats",
    "make_baseline",
    "training_stats",
]
