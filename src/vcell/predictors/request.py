"""What a prediction request names: the context's cells, the cells looked at, and the perturbations.

Shared by :func:`~vcell.predictors.predict.predict_context` and
:func:`~vcell.predictors.predict.write_prediction` (``vcell predict``).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pandas as pd

from vcell.data.dataset import PerturbationData
from vcell.data.spec import split_combo
from vcell.errors import VcellError, did_you_mean, preview
from vcell.predictors.base import Predictor

log = logging.getLogger(__name__)

#: Cells predicted per perturbation when a request names labels (or 'all') without counts.
DEFAULT_CELLS = 100


def context_cells(index, context: str, where: str) -> tuple[str, np.ndarray]:
    """The context's name and its cells. ``"dataset.context"`` (how splits name a context of a file
    with several datasets) is accepted too: the cells of that context in that dataset."""
    contexts = [str(c) for c in index.contexts]
    if context in contexts:
        return context, index.context_codes == contexts.index(context)
    keys = [str(k) for k in index.context_key_names]
    if context in keys and (index.context_key_codes == keys.index(context)).any():
        bare = context.split(".", 1)[1]
        return bare, index.context_key_codes == keys.index(context)
    raise VcellError(f"{where}: unknown context {context!r}{did_you_mean(context, contexts)} (contexts: {preview(contexts, n=10)})")


def cell_mask(cells, obs_names: pd.Index, name: str = "cells") -> np.ndarray:
    """A boolean mask over ``obs_names`` from a mask, integer positions or obs names (one error line otherwise)."""
    values = np.asarray(cells.to_numpy() if isinstance(cells, pd.Series | pd.Index) else cells)
    n = len(obs_names)
    if values.size == 0:
        return np.zeros(n, dtype=bool)
    if values.dtype == bool:
        if values.shape != (n,):
            raise VcellError(f"{name}: a boolean mask of {values.size:,} values for {n:,} cells; give one value per cell")
        return values
    mask = np.zeros(n, dtype=bool)
    if values.dtype.kind in "iu":
        bad = (values < -n) | (values >= n)
        if bad.any():
            raise VcellError(f"{name}: position {int(values[bad][0])} is out of range for {n:,} cells")
        mask[values] = True
        return mask
    if values.dtype.kind in "OUS":
        if not obs_names.is_unique:
            raise VcellError(f"{name}: cell names are not unique in the data; give a boolean mask or positions")
        pos = obs_names.get_indexer(values.astype(str))
        if (pos < 0).any():
            raise VcellError(f"{name}: {int((pos < 0).sum())} cell name(s) not in the data ({preview(values[pos < 0].astype(str), 3)})")
        mask[pos] = True
        return mask
    raise VcellError(f"{name}: give a boolean mask over the cells, their positions or their names (got {values.dtype} values)")


def requested_perturbations(
    predictor: Predictor, data: PerturbationData, in_ctx: np.ndarray, context: str, which, where: str
) -> tuple[list[str], int | dict[str, int]]:
    """``(labels, cells per label)`` that ``which`` names."""
    index = data.index
    if isinstance(which, str) and which.strip().lower() == "data":
        codes = index.pert_codes[in_ctx & ~index.is_control]
        if not len(codes):
            raise VcellError(f"{where}: context {context!r} has no perturbed cells to take the perturbations from; "
                             "predict every perturbation the model was trained on ('all', `--perturbations all`) or name them")
        labels = pd.Series(index.perts[codes].astype(str))
        counts = labels.value_counts(sort=False)
        return [str(p) for p in labels.unique()], {str(p): int(n) for p, n in counts.items()}
    if isinstance(which, str) and which.strip().lower() == "all":
        return predictor.trained_perturbations(), DEFAULT_CELLS
    labels = [which] if isinstance(which, str) else list(which)
    labels = list(dict.fromkeys(str(p).strip() for p in labels if str(p).strip()))
    if not labels:
        raise VcellError("no perturbations to predict: give 'all', 'data' or labels")
    control = str(data.spec.control)
    if control in labels:
        raise VcellError(f"perturbation {control!r} is the control label: the context's real control cells are what the "
                         "prediction starts from (and a log1p output holds them); name perturbations only")
    _warn_unknown(predictor, data, labels)
    return labels, DEFAULT_CELLS


def _warn_unknown(predictor: Predictor, data: PerturbationData, labels: list[str]) -> None:
    """Warn of labels with a target that neither the data nor the model's training knows (a
    misspelling, most likely), unless the model reads its targets from a gene table (it refuses
    a target absent from it)."""
    if predictor.reads_gene_table():
        return
    known = set(data.index.perts.astype(str))
    with contextlib.suppress(VcellError):
        known |= set(predictor.trained_perturbations())
    targets = {t for label in known for t in split_combo(label)}
    unknown = [p for p in labels if not all(t in targets for t in split_combo(p))]
    if unknown:
        log.warning("%s: %d perturbation(s) (%s) with a target that neither the data nor the training has, predicted without "
                    "training cells of their own%s", predictor.name, len(unknown), preview(unknown, 5),
                    did_you_mean(unknown[0], sorted(known)))
