"""Real and predicted effects (pseudobulk differences) of one held-out context: the data behind
the scatter plots and the perturbation-discrimination heatmaps."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import vcell.report.figures as F
from vcell.data.io import read_h5ad
from vcell.errors import VcellError
from vcell.report.inputs import Bench

__all__ = ["MAX_DISCRIMINATION", "ContextEffects", "context_effects", "discrimination_panel"]

#: The discrimination heatmap shows at most this many perturbations (largest real effects).
MAX_DISCRIMINATION = 50


@dataclass
class ContextEffects:
    """Real and predicted effects of one held-out context (rows: ``perts``, columns: ``genes``)."""

    perts: np.ndarray
    genes: np.ndarray
    real: np.ndarray | None = None
    pred: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _subset_context(adata, bench: Bench, context: str):
    col = bench.context_col
    if col and col in adata.obs.columns:
        labels = adata.obs[col].astype(str)
        if (labels == context).any() and (labels != context).any():
            return adata[(labels == context).to_numpy()].copy()
    return adata


def context_effects(bench: Bench, context: str) -> ContextEffects:
    """Real and predicted pseudobulk effects of one held-out context, for every model.

    Parameters
    ----------
    bench : Bench
        The benchmark directory, as :func:`~vcell.report.inputs.load_bench` read it.
    context : str
        The held-out context.

    Returns
    -------
    ContextEffects
        The effects; a missing or unreadable file becomes a line in ``warnings`` instead of an
        error, and a model whose prediction cannot be read is left out of ``pred``.
    """
    from vcell.eval.metrics import ExpressionData

    effects = ContextEffects(perts=np.array([], dtype=str), genes=np.array([], dtype=str))
    real_path = bench.real.get(context)
    if real_path is None:
        effects.warnings.append(f"bench.json names no real data for context {context}")
        return effects
    try:
        real = _subset_context(read_h5ad(real_path), bench, context)
    except VcellError as exc:
        effects.warnings.append(str(exc))
        return effects
    for model in bench.models:
        run = bench.run(model, context)
        if run is None or run.prediction is None:
            effects.warnings.append(f"no prediction of model {model} for context {context} in bench.json")
            continue
        try:
            pred = _subset_context(read_h5ad(run.prediction), bench, context)
            if set(pred.var_names) == set(real.var_names) and not pred.var_names.equals(real.var_names):
                pred = pred[:, real.var_names].copy()
            data = ExpressionData.from_anndata(real, pred, pert_col=bench.pert_col, control=bench.control, energy=False)
        except VcellError as exc:
            effects.warnings.append(f"{model}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a bad file costs its panels, not the report
            effects.warnings.append(f"{model}: {run.prediction}: {type(exc).__name__}: {exc}")
            continue
        if effects.real is None:
            effects.perts, effects.genes, effects.real = data.perturbations, data.genes, data.real_effect
        elif not np.array_equal(data.perturbations, effects.perts):
            effects.warnings.append(f"{model}: the prediction's perturbations differ from the other models'; left out")
            continue
        effects.pred[model] = data.pred_effect
    return effects


def discrimination_panel(
    effects: ContextEffects, model: str, max_perts: int = MAX_DISCRIMINATION
) -> tuple[np.ndarray, list[str], list[int]]:
    """One model's perturbation-discrimination heatmap data.

    Parameters
    ----------
    effects : ContextEffects
        The context's effects, with ``model`` in ``effects.pred``.
    model : str
        The model whose predicted effects are the rows.
    max_perts : int
        Show at most this many perturbations (those with the largest real effect norm).

    Returns
    -------
    tuple of (numpy.ndarray, list of str, list of int)
        The L1 distances among the shown perturbations, their names, and the 1-based rank of
        each row's correct perturbation among *all* perturbations, as ``discrimination_score_l1``
        ranks it (``score = 1 - (rank - 1) / n``).
    """
    real, pred, perts = effects.real, effects.pred[model], effects.perts
    n = perts.size
    shown = np.arange(n)
    if n > max_perts:
        norms = np.linalg.norm(real, axis=1)
        shown = np.sort(np.argsort(-norms, kind="stable")[:max_perts])
    full_rows = F.discrimination_distances(real, pred[shown], perts[shown], effects.genes)  # [shown, all]
    ranks = [int(np.flatnonzero(np.argsort(row) == t)[0]) + 1 for row, t in zip(full_rows, shown)]
    return full_rows[:, shown], [str(p) for p in perts[shown]], ranks
