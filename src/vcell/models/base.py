"""The predictor interface shared by the baselines and the STATE models.

A predictor is fitted on a :class:`~vcell.data.dataset.PerturbationData` and a
:class:`~vcell.data.splits.Split` (it may only look at the training cells and at control
cells), then predicts, for a target context, a set of perturbed cells from that context's real
control cells. The output is what ``vcell eval run`` expects: predicted cells with the same
genes, the perturbation column and the context column, the real control cells appended.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.dataset import PerturbationData
from vcell.data.splits import Split
from vcell.errors import VcellError


class Predictor(ABC):
    """Base class: ``fit(data, split)`` then ``predict(controls, perturbations)``."""

    name: str = "predictor"

    @abstractmethod
    def fit(self, data: PerturbationData, split: Split) -> Predictor:
        """Learn from the training cells (``split`` role ``train``) and all control cells."""

    @abstractmethod
    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """The predicted change of each perturbation in ``context``: ``[len(perturbations), genes]``.

        Subclasses that predict whole cells (not a shift) override :meth:`predict` instead.
        """

    def predict(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> ad.AnnData:
        """Predicted cells of each perturbation in ``context``, real controls appended.

        Each predicted cell is a real control cell of the context (drawn with a seeded
        generator) plus the perturbation's predicted shift, clipped at 0 so log1p expression
        stays non-negative.
        """
        shifts = self.predict_shift(controls, perturbations, context)
        return assemble_prediction(self._spec, controls, perturbations, context, shifts, cells_per_perturbation, seed)

    @property
    def _spec(self):
        spec = getattr(self, "spec", None)
        if spec is None:
            raise VcellError(f"{self.name}: predict() called before fit()")
        return spec


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def assemble_prediction(
    spec,
    controls: ad.AnnData,
    perturbations: Sequence[str],
    context: str,
    shifts: np.ndarray | None,
    cells_per_perturbation: int | Mapping[str, int],
    seed: int = 0,
    cells: Mapping[str, np.ndarray] | None = None,
) -> ad.AnnData:
    """Build the prediction AnnData from per-perturbation shifts (or ready-made ``cells``)."""
    if controls.n_obs == 0:
        raise VcellError(f"context {context!r} has no control cells to predict from")
    rng = np.random.default_rng(seed)
    basal = _dense(controls.X)
    blocks, labels = [], []
    for i, pert in enumerate(perturbations):
        n = cells_per_perturbation[pert] if isinstance(cells_per_perturbation, Mapping) else int(cells_per_perturbation)
        if cells is not None:
            block = np.asarray(cells[pert], dtype=np.float32)
        else:
            rows = rng.choice(controls.n_obs, size=n, replace=n > controls.n_obs)
            block = np.clip(basal[rows] + shifts[i][None, :].astype(np.float32), 0, None)
        blocks.append(block)
        labels += [pert] * len(block)
    blocks.append(basal)
    labels += [spec.control] * controls.n_obs
    X = np.vstack(blocks) if blocks else np.zeros((0, controls.n_vars), np.float32)
    context_col = spec.context_col or "context"
    obs = pd.DataFrame(
        {spec.pert_col: pd.Categorical(labels), context_col: context},
        index=[f"pred{i}" for i in range(len(labels) - controls.n_obs)] + [str(n) for n in controls.obs_names],
    )
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=controls.var_names.copy()))
