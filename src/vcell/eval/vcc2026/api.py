"""The VCC 2026 evaluator on AnnData objects in memory (one context): what the CLI does on files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd

from vcell.errors import VcellError
from vcell.eval.vcc2026.anchor import BASE_SEED, N_SPLITS
from vcell.eval.vcc2026.baseline import BASELINE_SEED
from vcell.eval.vcc2026.evaluate import evaluate_cells
from vcell.eval.vcc2026.files import ContextScale, Options, context_scale, reference_context
from vcell.eval.vcc2026.inputs import cells_from_anndata, check_genes, check_perturbations
from vcell.eval.vcc2026.reader import prediction_pert_col
from vcell.eval.vcc2026.scale import score_context
from vcell.eval.vcc2026.tables import agg_means, agg_wide, results_long

__all__ = ["Result2026", "evaluate_2026", "scale_2026", "score_2026"]


class Result2026(NamedTuple):
    """One prediction's VCC 2026 tables: ``.results`` and ``.agg`` as :class:`vcell.evaluate`'s
    result names them, and a ``(results, agg)`` pair to unpack."""

    results: pd.DataFrame  # long: perturbation, metric, value (cell-eval2's results.csv)
    agg: pd.DataFrame  # wide: statistic x metric (cell-eval2's agg_results.csv)


def evaluate_2026(
    pred: ad.AnnData | Mapping[str, ad.AnnData], real: ad.AnnData, pert_col: str = "target_gene", control: str = "non-targeting",
    target_genes: dict[str, str | None] | None = None, no_target_genes: bool = False, threads: int = 2,
    layer: str | None = None,
) -> Result2026 | dict[str, Result2026]:
    """Score raw-count predictions with the VCC 2026 metrics (``vcell eval run --profile vcc2026``).

    Parameters
    ----------
    pred : anndata.AnnData or mapping of name to anndata.AnnData
        Raw counts, the same genes in the same order as ``real``; its own control cells are
        ignored. Several predictions (a mapping) are scored against one summary of the reference.
    real : anndata.AnnData
        Raw counts with the control cells.
    pert_col, control : str
        Perturbation column and control label.
    target_genes : dict, optional
        Perturbation -> target gene (``None``: none); by default a label naming a gene targets it.
    no_target_genes : bool
        Exclude no gene: the perturbations are not genes (drugs, cytokines) or their targets are not measured.
    threads : int
        Threads.
    layer : str, optional
        Read the reference's counts from ``layers[layer]`` (e.g. ``"counts"`` beside a log1p
        ``X``), and each prediction's from that layer when it has one, else from its ``X``.

    Returns
    -------
    Result2026, or a dict of them by name for a mapping
        ``.results`` (long: perturbation, metric, value) and ``.agg`` (wide), cell-eval2's
        ``results.csv`` and ``agg_results.csv``; it also unpacks as ``results, agg = ...``.
    """
    many = isinstance(pred, Mapping)
    preds = dict(pred) if many else {"pred": pred}
    real_cells = cells_from_anndata(real, pert_col, "real", layer)
    cells = {}
    for name, adata in preds.items():  # every prediction checked before the reference is summarised
        side_layer = layer if layer in adata.layers else None  # a counts prediction has its counts in X
        cells[name] = cells_from_anndata(adata, prediction_pert_col(adata.obs.columns, pert_col, name), name, side_layer)
        check_genes(cells[name].genes, real_cells.genes, name, "real")
        check_perturbations(cells[name].labels, real_cells.labels, control, name, "real")
    ref, perts = reference_context(real_cells, Options(pert_col, control, "", None, no_target_genes, threads), target_genes)
    out = {}
    for name, pred_cells in cells.items():
        values, ratio = evaluate_cells(ref, pred_cells, threads)
        results = results_long(perts, values)
        out[name] = Result2026(results, agg_wide(results, ratio))
    return out if many else out["pred"]


def scale_2026(
    real: ad.AnnData, pert_col: str = "target_gene", control: str = "non-targeting",
    target_genes: dict[str, str | None] | None = None, no_target_genes: bool = False, splits: int = N_SPLITS,
    anchor_seed: int = BASE_SEED, seed: int = BASELINE_SEED, threads: int = 2, layer: str | None = None,
) -> ContextScale:
    """Both ends of the 2026 scale of a reference (``vcell eval baseline --profile vcc2026``).

    Parameters
    ----------
    real : anndata.AnnData
        Raw counts with the control cells (``X``, or ``layers[layer]``).
    pert_col, control, target_genes, no_target_genes, threads
        As :func:`evaluate_2026`.
    splits : int
        The replicate anchor's split-half draws (cell-eval2: 5).
    anchor_seed, seed : int
        Seeds of the anchor's splits and of the baseline's draws (cell-eval2's by default).
    layer : str, optional
        Read the counts from ``layers[layer]`` instead of ``X``.

    Returns
    -------
    ContextScale
        ``baseline_agg`` (the mean-response baseline scored) and ``anchor`` (the split-half
        replicate: ``anchor.agg``, ``anchor.splits``).
    """
    opts = Options(pert_col, control, "", None, no_target_genes, threads)
    return context_scale(cells_from_anndata(real, pert_col, "real", layer), opts, target_genes, splits, anchor_seed, seed)


def score_2026(agg: pd.DataFrame, scale: ContextScale, strict: bool = True) -> pd.DataFrame:
    """The scaled 2026 score of an ``agg_results`` table against a reference's scale (``vcell eval score``).

    Parameters
    ----------
    agg : pandas.DataFrame
        The prediction's ``agg_results`` (:func:`evaluate_2026`).
    scale : ContextScale
        The reference's scale (:func:`scale_2026`).
    strict : bool
        A metric whose scale is degenerate (the baseline already at the replicate) is an error, as
        in cell-eval2; ``False``: it scores NaN and ``avg_score`` is the mean of the others (as
        ``vcell bench`` does).

    Returns
    -------
    pandas.DataFrame
        One row per metric (value, baseline, replicate, from_baseline, score), then ``avg_score``.
    """
    if not isinstance(agg, pd.DataFrame):
        raise VcellError(f"agg: the agg_results DataFrame (evaluate_2026 returns the pair (results, agg_results)), "
                         f"got {type(agg).__name__}")
    b, r = scale.ends()
    table = score_context(agg_means(agg), b, r, strict=strict)
    table.insert(0, "context", np.full(len(table), "", dtype=object))
    return table
