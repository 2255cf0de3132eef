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
``linear``         ridge regression of effects on perturbation features (``pert_features``:
                   multi-hot targets and/or gene tables) and context one-hot; alpha by seeded
                   K-fold CV.
``kernel_ridge``   kernel ridge regression (rbf or cosine) of effects, relative to each
                   context's mean effect, on perturbation features (``pert_features``);
                   alpha and gamma by seeded K-fold CV over perturbation labels.
=================  ========================================================================
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.aggregate import cell_mean
from vcell.data.dataset import PerturbationData
from vcell.data.splits import Split
from vcell.errors import VcellError, did_you_mean, preview
from vcell.predictors.base import Predictor, cell_count
from vcell.predictors.kernel_ridge import KernelRidgeBaseline
from vcell.predictors.linear import DEFAULT_ALPHAS, LinearBaseline
from vcell.predictors.pseudobulk import PseudobulkBaseline, TrainingStats, training_stats

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The baselines


class ControlMean(PseudobulkBaseline):
    """No change: every perturbation is predicted as the target context's control cells.

    The shift is 0, so the predicted cells are resampled real controls and the predicted
    pseudobulk is the target context's control pseudobulk.
    """

    name = "control_mean"

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """All-zero shifts, ``[len(perturbations), genes]``."""
        cols = self._columns(controls)
        return np.zeros((len(perturbations), len(cols)), dtype=np.float64)


class CellMean(PseudobulkBaseline):
    """The VCC "cell-mean" baseline: every perturbed cell is the same vector.

    The vector is the mean over the training groups' pseudobulks, as ``cell-eval baseline``
    builds it on the training data: groups are perturbation labels (cells pooled over the
    training contexts) and the controls of the training contexts are one more group.
    :meth:`predict` outputs exactly that vector for each predicted cell (no control noise) and
    appends the real controls.

    The vector is a mean of log1p values, which is no cell's composition: drawn as counts it
    would put the molecules of genes expressed in few cells on the others. Counts are drawn
    instead from the same mean taken of normalised expression (``expm1``), log1p'd again
    (:meth:`counts_basis`): the groups' mean composition.
    """

    name = "cell_mean"

    def fit(self, data: PerturbationData, split: Split) -> CellMean:
        """The training pseudobulks (as every baseline), then the vector with :func:`vcell.data.aggregate.cell_mean`."""
        super().fit(data, split)
        idx = data.index
        keys = idx.context_key_codes.astype(np.int64)
        is_ctrl = idx.is_control
        train = split.mask("train") & ~is_ctrl & (idx.pert_codes >= 0)
        train &= np.isin(keys, np.unique(keys[is_ctrl]))  # the cells training_stats uses
        names = np.asarray(idx.perts).astype(str)
        perts = np.unique(names[idx.pert_codes[train]])
        codes = np.full(idx.n_cells, -1, dtype=np.int64)
        codes[train] = np.searchsorted(perts, names[idx.pert_codes[train]])
        codes[is_ctrl & np.isin(keys, np.unique(keys[train]))] = len(perts)  # controls of the trained contexts
        self.vector_ = cell_mean(data.adata.X, codes, control=len(perts), n_groups=len(perts) + 1)
        self.counts_vector_ = np.log1p(cell_mean(data.adata.X, codes, control=len(perts), n_groups=len(perts) + 1, transform=np.expm1))
        log.info("cell_mean: mean of %d training perturbation pseudobulks and the control pseudobulk", len(perts))
        return self

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """The baseline vector minus the mean of ``controls`` (the pseudobulk shift it implies)."""
        cols = self._columns(controls)
        basal = np.asarray(controls.X.mean(axis=0), dtype=np.float64).ravel()
        return np.tile(self.vector_[cols] - basal, (len(perturbations), 1))

    def predict_cells(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """Each predicted cell is the baseline vector (no control noise)."""
        vec = self.vector_[self._columns(controls)].astype(np.float32)
        return {pert: np.tile(vec, (cell_count(cells_per_perturbation, pert), 1)) for pert in perturbations}

    def counts_basis(self, cells: ad.AnnData, predicted: np.ndarray) -> ad.AnnData:
        """``cells`` with each predicted cell (mask ``predicted``) the groups' mean composition (log1p
        of the mean normalised expression); a model saved without it draws from the vector."""
        vector = getattr(self, "counts_vector_", None)
        if vector is None:
            return cells
        X = cells.X.toarray() if sp.issparse(cells.X) else np.array(cells.X, dtype=np.float32)  # the one copy made
        X[predicted] = vector[self._columns(cells)].astype(np.float32)
        base = cells.uns.get("vcell", {})
        uns = {**cells.uns, "vcell": {**(dict(base) if isinstance(base, Mapping) else {}),
                                      "counts_basis": "cell_mean's groups' mean normalised expression (log1p of the mean of expm1)"}}
        return ad.AnnData(X=X, obs=cells.obs, var=cells.var, uns=uns)


class PertMean(PseudobulkBaseline):
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
                preview(fallback, n=10, quote=False),
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


# --------------------------------------------------------------------------------------------
# Registry

BASELINES: dict[str, type[Predictor]] = {
    ControlMean.name: ControlMean,
    CellMean.name: CellMean,
    PertMean.name: PertMean,
    ContextMean.name: ContextMean,
    LinearBaseline.name: LinearBaseline,
    KernelRidgeBaseline.name: KernelRidgeBaseline,
}


def make_baseline(name: str, **options) -> Predictor:
    """A fresh, unfitted baseline by name (``options`` go to its constructor)."""
    if name not in BASELINES:
        hint = did_you_mean(name, BASELINES, n=2)
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
    "KernelRidgeBaseline",
    "LinearBaseline",
    "PertMean",
    "TrainingStats",
    "make_baseline",
    "training_stats",
]
