"""One way to predict: a context's perturbations from a dataset, for ``vcell predict``, ``vcell bench`` and Python.

The output is log1p (predicted cells, then the context's real controls) or, with
``output="counts"``, integral raw counts of the predicted cells only (:mod:`vcell.predictors.counts`).
``uns["vcell"]`` says which: ``model_space`` (what the model predicts in), ``expression`` and
``output`` (what the object holds), and for counts the library-size rule, depth and seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.dataset import PerturbationData
from vcell.data.spec import DataSpec
from vcell.errors import VcellError, did_you_mean, preview
from vcell.predictors.base import Predictor
from vcell.predictors.counts import CONTROL_CELL_COL, library_source, parse_depth, parse_output, to_counts

DEFAULT_CELLS = 100


def predict_context(
    predictor: Predictor,
    data: PerturbationData,
    context: str,
    perturbations: str | Sequence[str] = "data",
    cells_per_perturbation: int | Mapping[str, int] | None = None,
    seed: int = 0,
    cells: np.ndarray | None = None,
    output: str = "log1p",
    depth: int | str = "controls",
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
        Seed of the control cells drawn (and of the counts drawn).
    cells
        Boolean mask over ``data``'s cells: only these are looked at (e.g. a split's test and
        control cells).
    output
        ``"log1p"`` (default) or ``"counts"``: integral raw counts per predicted cell, controls
        dropped, as the Virtual Cell Challenge 2026 takes them (:func:`~vcell.predictors.counts.to_counts`).
    depth
        With ``output="counts"``: ``"controls"`` (each cell at the library size of the control cell
        it started from, or one drawn from the controls'; needs the raw counts of ``data``'s
        controls in ``layers["counts"]`` or an obs total column) or counts per cell (e.g. 20000).

    Returns
    -------
    The predicted cells, then the context's real control cells (log1p), with ``data.spec``'s
    perturbation and context columns and control label; column ``control_cell`` names the real
    control each predicted cell started from when the model says so. ``output="counts"``: the
    predicted cells only, as counts.
    """
    spec, index = data.spec, data.index
    where = str(data.path) if data.path is not None else "the data"
    output = parse_output(output)
    depth = parse_depth(depth)
    if output != "counts" and depth != "controls":
        raise VcellError(f"depth {depth}: the depth of drawn counts; add output='counts' (the default output is log1p)")
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
    controls = data.adata[controls_mask]
    controls = controls.to_memory() if data.adata.isbacked else controls.copy()  # only the controls are read
    if output == "counts" and depth == "controls" and library_source(controls) is None:
        raise VcellError(f"{where}: context {context!r}: no raw counts to take the control cells' library sizes from "
                         "(no layers['counts'], no obs total-count column): give a fixed depth (--depth 20000, depth=20000)")
    pred = predictor.predict(controls, perts, context, cells_per_perturbation=sizes, seed=seed)
    _name_sources(pred, predictor.source_controls(controls.n_obs, perts, sizes, seed), controls.obs_names)
    pred = _relabel(pred, predictor.spec, spec)
    space = getattr(predictor, "space", "log1p")
    pred.uns["vcell"] = {"expression": space, "output": space, "model_space": space, "seed": int(seed)}
    if getattr(predictor, "effect_anchor", None) is not None:
        pred.uns["vcell"]["effect_anchor"] = predictor.effect_anchor
    if output == "counts":
        pred = to_counts(pred, controls, depth=depth, seed=seed, pert_col=spec.pert_col, control=spec.control, model_space=space)
    return pred


def _name_sources(pred: ad.AnnData, sources: list[np.ndarray] | None, names: pd.Index) -> None:
    """Column :data:`CONTROL_CELL_COL`: the real control each predicted cell started from (a control: itself)."""
    if sources is None or CONTROL_CELL_COL in pred.obs.columns:
        return
    names = np.asarray(names.astype(str))
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in sources] + [np.arange(len(names))])
    if len(rows) != pred.n_obs:  # a predictor whose cells do not line up with its draws: say nothing
        return
    pred.obs[CONTROL_CELL_COL] = names[rows]


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
