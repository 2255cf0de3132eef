"""One way to predict: a context's perturbations from a dataset, for ``vcell predict``, ``vcell bench`` and Python."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.dataset import PerturbationData
from vcell.data.spec import DataSpec
from vcell.errors import VcellError, did_you_mean, preview
from vcell.predictors.base import Predictor

DEFAULT_CELLS = 100


def predict_context(
    predictor: Predictor,
    data: PerturbationData,
    context: str,
    perturbations: str | Sequence[str] = "data",
    cells_per_perturbation: int | Mapping[str, int] | None = None,
    seed: int = 0,
    cells: np.ndarray | None = None,
) -> ad.AnnData:
    """Predicted cells of ``context``'s perturbations from its real control cells in ``data``.

    Parameters
    ----------
    predictor
        A fitted predictor (:func:`~vcell.predictors.registry.make_model` + ``fit``, or
        :meth:`~vcell.predictors.st.STPredictor.from_checkpoint`).
    data
        The dataset holding the context's control cells (log1p).
    context
        The context to predict (a value of ``data.spec.context_col``).
    perturbations
        ``"data"``: the perturbations with cells of the context in ``data`` (in order of first
        appearance), each predicted with as many cells as observed; ``"all"``: every perturbation
        the model was trained on; or a list of labels.
    cells_per_perturbation
        Cells per perturbation; default: as observed (``"data"``) or 100.
    seed
        Seed of the control cells drawn.
    cells
        Boolean mask over ``data``'s cells: only these are looked at (e.g. a split's test and
        control cells).

    Returns
    -------
    The predicted cells, then the context's real control cells, with ``data.spec``'s perturbation
    and context columns and control label.
    """
    spec, index = data.spec, data.index
    where = str(data.path) if data.path is not None else "the data"
    contexts = [str(c) for c in index.contexts]
    if context not in contexts:
        raise VcellError(f"{where}: unknown context {context!r}{did_you_mean(context, contexts)} (contexts: {preview(contexts, n=10)})")
    in_ctx = index.context_codes == contexts.index(context)
    if cells is not None:
        in_ctx &= np.asarray(cells, dtype=bool)
    controls_mask = in_ctx & index.is_control
    if not controls_mask.any():
        raise VcellError(f"{where}: context {context!r} has no control cells ({spec.control!r}) to predict from")
    perts, sizes = _perturbations(predictor, data, in_ctx, context, perturbations, where)
    if cells_per_perturbation is not None:
        sizes = cells_per_perturbation
    if isinstance(sizes, int) and sizes < 1:
        raise VcellError(f"cells per perturbation must be >= 1, got {sizes}")
    controls = data.adata[controls_mask].copy()
    pred = predictor.predict(controls, perts, context, cells_per_perturbation=sizes, seed=seed)
    return _relabel(pred, predictor.spec, spec)


def _perturbations(
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
    return labels, DEFAULT_CELLS


def _relabel(pred: ad.AnnData, model_spec: DataSpec | None, spec: DataSpec) -> ad.AnnData:
    """``pred`` with the data's column names and control label where the model's differ."""
    if model_spec is None:
        return pred
    model_ctx, ctx = model_spec.context_col or "context", spec.context_col or "context"
    obs = pred.obs
    if model_spec.control != spec.control:
        labels = obs[model_spec.pert_col].astype(str)
        obs[model_spec.pert_col] = pd.Categorical(labels.where(labels != model_spec.control, spec.control))
    pred.obs = obs.rename(columns={model_spec.pert_col: spec.pert_col, model_ctx: ctx})
    return pred
