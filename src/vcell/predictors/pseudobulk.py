"""What every pseudobulk baseline shares: the training pseudobulks and the fitted base class.

Statistics are pseudobulks (per-group mean expression) computed with sparse indicator products,
reading the matrix in row blocks, so a backed (on-disk) dataset works and the matrix is never
densified as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.aggregate import group_sums
from vcell.data.dataset import PerturbationData
from vcell.data.splits import Split
from vcell.errors import VcellError
from vcell.predictors.base import ShiftPredictor

log = logging.getLogger("vcell.predictors.baselines")


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
    log.debug(
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


# --------------------------------------------------------------------------------------------
# Base class of the pseudobulk baselines


class PseudobulkBaseline(ShiftPredictor):
    """Fits :class:`TrainingStats`; subclasses turn them into per-perturbation shifts."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def fit(self, data: PerturbationData, split: Split) -> PseudobulkBaseline:
        """Compute the training pseudobulks, then the subclass's parameters (:meth:`_fit`)."""
        _check_inputs(self.name, data, split)
        self.spec = data.spec
        self.stats_ = training_stats(data, split)
        self.genes_ = self.stats_.genes
        self._fit(self.stats_)
        return self

    def _fit(self, stats: TrainingStats) -> None:
        """Subclass hook: derive the model's parameters."""

    def trained_perturbations(self) -> list[str]:
        """The perturbation labels of the training cells, sorted."""
        if getattr(self, "stats_", None) is None:
            raise VcellError(f"{self.name}: predict() called before fit()")
        return sorted(str(p) for p in self.stats_.groups["perturbation"].unique())

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
