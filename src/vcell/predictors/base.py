"""The predictor interface shared by the baselines and the STATE models.

A predictor is fitted on a :class:`~vcell.data.dataset.PerturbationData` and a
:class:`~vcell.data.splits.Split` (it may only look at the training cells and at control
cells), then :meth:`Predictor.predict` returns, for a target context, a set of perturbed cells
made from that context's real control cells. The output is what ``vcell eval run`` expects:
predicted cells with the same genes, the perturbation column and the context column, the real
control cells appended (:func:`assemble_prediction`). Baselines that predict one expression
shift per perturbation derive from :class:`ShiftPredictor`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.dataset import PerturbationData
from vcell.data.labels import label_rng
from vcell.data.rows import MemoryRows
from vcell.data.spec import DataSpec
from vcell.data.splits import Split
from vcell.errors import VcellError


class Predictor(ABC):
    """Base class: ``fit(data, split)`` then ``predict(controls, perturbations, context)``.

    A subclass implements :meth:`fit` and :meth:`predict_cells`; :meth:`predict` is the same for all.
    """

    name: str = "predictor"
    spec: DataSpec | None = None
    #: The expression space :meth:`predict` writes (``vcell.predictors.counts`` turns it into counts).
    space: str = "log1p"

    @abstractmethod
    def fit(self, data: PerturbationData, split: Split) -> Predictor:
        """Learn from the training cells (``split`` role ``train``) and all control cells; returns ``self``."""

    def predict(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> ad.AnnData:
        """Predicted cells of each perturbation in ``context`` from its real ``controls``, controls appended.

        Parameters
        ----------
        controls
            The context's real control cells (log1p), any gene order the model knows.
        perturbations
            Labels to predict.
        context
            The context's name (written to the output's context column).
        cells_per_perturbation
            How many cells to predict per perturbation (one number, or one per label).
        seed
            Seed of the control cells drawn for the predicted cells.

        Returns
        -------
        The predicted cells (:meth:`predict_cells`), then the real controls
        (:func:`assemble_prediction`).
        """
        perturbations = [str(p) for p in perturbations]
        _require_controls(controls, context)
        controls = self.prepare_controls(controls)
        cells = self.predict_cells(controls, perturbations, context, cells_per_perturbation, seed)
        return assemble_prediction(self._spec, controls, context, cells)

    def prepare_controls(self, controls: ad.AnnData) -> ad.AnnData:
        """The control cells as :meth:`predict_cells` wants them (here: unchanged)."""
        return controls

    @abstractmethod
    def predict_cells(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """``{perturbation: predicted cells [n, genes]}`` from ``controls`` (one context), genes as in ``controls``."""

    def source_controls(
        self,
        n_controls: int,
        perturbations: Sequence[str],
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> list[np.ndarray] | None:
        """The control cell each predicted cell of :meth:`predict_cells` started from, or ``None``.

        One array of rows into the (prepared) controls per perturbation, in the order of that
        perturbation's predicted cells; ``None`` when the predicted cells do not start from one
        control cell each (here: the default). Used to give a predicted cell drawn as counts the
        library size of its own control cell (:mod:`vcell.predictors.counts`).
        """
        return None

    def counts_basis(self, cells: ad.AnnData, predicted: np.ndarray) -> ad.AnnData:
        """The log1p cells whose composition the counts of ``cells`` are drawn from
        (:mod:`vcell.predictors.counts`; ``predicted``: the mask of its predicted, not control,
        rows): here the cells themselves."""
        return cells

    def reads_gene_table(self) -> bool:
        """Whether the model takes its perturbations' targets from a gene table (``pert_features``
        other than one-hot; it then refuses a target absent from the table): the fitted or loaded
        features when there are some, else the option it was built with."""
        from vcell.features.perturbations import ONEHOT, parse_sources

        features = getattr(self, "features_", None) or getattr(self, "features", None)
        if features is not None:
            return not features.is_onehot
        value = getattr(self, "pert_features", None)
        return value is not None and parse_sources(value) != [ONEHOT]

    def predicts_unseen_targets(self) -> bool:
        """Whether the model can predict a target it was never trained on (here: yes, by a fallback
        or from its features; a one-hot ST model cannot)."""
        return True

    def check_fit(self, data: PerturbationData, split: Split, predicted: Sequence[str]) -> None:
        """Refuse, before any training, what fitting on ``split`` and then predicting ``predicted``
        would refuse later, as one :class:`VcellError` line: here a target of ``predicted`` that
        the model's gene table lacks and no training cell has (a target seen only in validation
        cells counts as unseen: no training step teaches its one-hot column)."""
        value = getattr(self, "pert_features", None)
        if value is None or not self.reads_gene_table():
            return
        from vcell.data.trained import pert_vocabulary, trained_labels
        from vcell.features.perturbations import PertFeatures

        trained = pert_vocabulary(trained_labels(data, split, ("train",)), data.spec.control)
        PertFeatures.build(value, trained).check([str(p) for p in predicted], data.spec.control)

    def trained_perturbations(self) -> list[str]:
        """The perturbation labels the model was trained on (control excluded), in a fixed order."""
        raise VcellError(f"{self.name}: this model keeps no list of trained perturbations; name the perturbations to predict")

    @property
    def _spec(self) -> DataSpec:
        if self.spec is None:
            raise VcellError(f"{self.name}: predict() called before fit()")
        return self.spec


class ShiftPredictor(Predictor):
    """A predictor of one expression shift per perturbation, added to resampled real control cells."""

    @abstractmethod
    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """The predicted change of each perturbation in ``context``: ``[len(perturbations), genes]``."""

    def predict_cells(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """Each predicted cell is a real control cell (drawn with ``seed``) plus the perturbation's
        shift (:meth:`predict_shift`), clipped at 0 so log1p expression stays non-negative."""
        shifts = self.predict_shift(controls, perturbations, context)
        return shifted_cells(controls, perturbations, shifts, cells_per_perturbation, seed)

    def source_controls(
        self,
        n_controls: int,
        perturbations: Sequence[str],
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> list[np.ndarray] | None:
        """The rows :func:`shifted_cells` drew (:func:`control_draws`); ``None`` for a subclass
        that replaces :meth:`predict_cells` without saying where its cells start."""
        if type(self).predict_cells is not ShiftPredictor.predict_cells:
            return None
        return control_draws(n_controls, [str(p) for p in perturbations], cells_per_perturbation, seed)


def cell_count(cells_per_perturbation: int | Mapping[str, int], perturbation: str) -> int:
    """The number of cells to predict for ``perturbation``."""
    if isinstance(cells_per_perturbation, Mapping):
        return int(cells_per_perturbation[perturbation])
    return int(cells_per_perturbation)


def _require_controls(controls: ad.AnnData, context: str) -> None:
    if controls.n_obs == 0:
        raise VcellError(f"context {context!r} has no control cells to predict from")


def control_draws(
    n_controls: int,
    perturbations: Sequence[str],
    cells_per_perturbation: int | Mapping[str, int],
    seed: int = 0,
) -> list[np.ndarray]:
    """The control cells the predicted cells start from: one array of rows per perturbation.

    Drawn without replacement unless a perturbation asks for more cells than there are
    controls, each perturbation from its own generator, seeded by ``seed`` and its label: a
    perturbation starts from the same control cells whatever else is predicted with it, so a
    prediction made in pieces (:func:`vcell.predictors.predict.write_prediction`) is the one
    made at once. The one draw of :func:`shifted_cells` and the State Transition model, so
    :meth:`Predictor.source_controls` can say which control each predicted cell came from.
    """
    rows = []
    for pert in perturbations:
        n = cell_count(cells_per_perturbation, pert)
        if n < 0:
            raise VcellError(f"cells per perturbation must be >= 0, got {n} for {pert!r}")
        rng = label_rng(seed, pert)
        rows.append(rng.choice(n_controls, size=n, replace=n > n_controls))
    return rows


def shifted_cells(
    controls: ad.AnnData,
    perturbations: Sequence[str],
    shifts: np.ndarray,
    cells_per_perturbation: int | Mapping[str, int],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``{perturbation: cells}``: control cells drawn with ``seed`` (:func:`control_draws`) plus the
    perturbation's shift, clipped at 0."""
    basal = MemoryRows(controls.X)  # each perturbation's rows made dense, never all the controls at once
    cells = {}
    for i, (pert, rows) in enumerate(zip(perturbations, control_draws(controls.n_obs, perturbations, cells_per_perturbation, seed))):
        cells[pert] = np.clip(basal.read(rows) + shifts[i][None, :].astype(np.float32), 0, None)
    return cells


def assemble_prediction(spec: DataSpec, controls: ad.AnnData, context: str, cells: Mapping[str, np.ndarray]) -> ad.AnnData:
    """The prediction AnnData: the predicted ``cells`` of each perturbation, then the real ``controls``.

    The output has the controls' genes, ``spec.pert_col`` and the context column (``spec.context_col``
    or ``context``), CSR float32 ``X``, built in place block by block: memory holds the dense
    predictions and the CSR result, never a dense copy of both stacked.
    """
    _require_controls(controls, context)
    basal = controls.X if sp.issparse(controls.X) else np.asarray(controls.X, dtype=np.float32)
    pred = assemble_cells(spec, controls.var_names, context, cells)
    X = _stack_csr([pred.X, basal], controls.n_vars)
    obs = pd.concat([pred.obs, control_obs(spec, controls.obs_names, context)])
    obs[spec.pert_col] = pd.Categorical(obs[spec.pert_col])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=controls.var_names.copy()))


def assemble_cells(spec: DataSpec, genes: pd.Index, context: str, cells: Mapping[str, np.ndarray], first: int = 0) -> ad.AnnData:
    """The predicted ``cells`` of each perturbation as one AnnData (CSR float32, no controls),
    cells named ``pred{first}``, ``pred{first + 1}``, ...; the perturbation labels as strings."""
    blocks = [np.asarray(block, dtype=np.float32) for block in cells.values()]
    labels = [pert for pert, block in zip(cells, blocks) for _ in range(len(block))]
    obs = pd.DataFrame({spec.pert_col: np.array(labels, dtype=object), spec.context_col or "context": context},
                       index=[f"pred{first + i}" for i in range(len(labels))])
    return ad.AnnData(X=_stack_csr(blocks, len(genes)), obs=obs, var=pd.DataFrame(index=pd.Index(genes).copy()))


def control_obs(spec: DataSpec, names: pd.Index, context: str) -> pd.DataFrame:
    """The obs rows of the real control cells appended to a log1p prediction."""
    return pd.DataFrame({spec.pert_col: np.array([spec.control] * len(names), dtype=object), spec.context_col or "context": context},
                        index=[str(n) for n in names])


def _stack_csr(blocks: list, n_cols: int, rows_per_part: int = 4096) -> sp.csr_matrix:
    """Row blocks (dense or sparse) stacked into one float32 CSR matrix, its arrays allocated once."""
    nnz = sum(b.nnz if sp.issparse(b) else int(np.count_nonzero(b)) for b in blocks)
    n_rows = sum(b.shape[0] for b in blocks)
    index = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    data, indices = np.empty(nnz, np.float32), np.empty(nnz, index)
    indptr = np.zeros(n_rows + 1, np.int64)
    row = pos = 0
    for block in blocks:
        for s in range(0, block.shape[0], rows_per_part):  # small parts: each conversion's temporaries stay small
            part = sp.csr_matrix(block[s:s + rows_per_part], dtype=np.float32)
            part.eliminate_zeros()
            k, m = part.nnz, part.shape[0]
            data[pos:pos + k], indices[pos:pos + k] = part.data, part.indices
            indptr[row + 1:row + m + 1] = part.indptr[1:] + pos
            row, pos = row + m, pos + k
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))
