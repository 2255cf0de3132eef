"""Scoring one prediction against one reference context with the VCC 2026 metrics.

:func:`evaluate_cells` takes two :class:`~vcell.eval.vcc2026.inputs.CountsCells` (the
reference and a prediction, one context) and returns the per-perturbation values and the
panel ratio; :func:`resolve_targets` decides each perturbation's target gene. The reference is
summarised once (:class:`Reference`) and can score several predictions (a model, the baseline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vcell.errors import VcellError, preview
from vcell.eval.de import bh_fdr
from vcell.eval.vcc2026.engine import Engine, run_tasks
from vcell.eval.vcc2026.inputs import CountsCells
from vcell.eval.vcc2026.metrics import (
    DE_METRICS,
    bulk_profiles,
    de_metrics,
    expression_errors,
    fold_changes,
    pds_cosine,
    ratio_of_sums,
)
from vcell.eval.vcc2026.summary import (
    Control,
    SideSummary,
    control_of,
    control_rows,
    control_task,
    side_task,
    summarise,
    summary_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    """Each perturbation's target gene (rows in the perturbations' order), as cell-eval2 resolves it.

    ``cols``: the gene's column (-1: none measured). ``stated``: the target-gene map or
    ``no_target_genes`` stated it (a gene, measured or not, or none). A stated target is
    authoritative for the DE metrics; a target resolved by its label's name is left out of the
    DE tables only where the reference's side tests its gene (:func:`de_targets`).
    """

    cols: np.ndarray
    stated: np.ndarray


def resolve_targets(
    perturbations: list[str], genes: pd.Index, target_map: dict[str, str | None] | None = None, no_target_genes: bool = False,
) -> Targets:
    """Each perturbation's target gene in ``genes``.

    A perturbation's own entry in ``target_map`` wins (a gene, or ``None`` for no target
    gene; a gene that is not measured excludes nothing, as in cell-eval2, and is named in a
    warning); otherwise, unless ``no_target_genes``, a label naming a gene targets that gene.
    A panel where no target is a measured gene and none is declared absent is refused: its
    perturbations are probably not genes (say ``no_target_genes``) or are named differently
    (give ``target_map``).
    """
    pos = {g: i for i, g in enumerate(genes)}
    out = np.full(len(perturbations), -1, dtype=np.int64)
    stated = np.zeros(len(perturbations), dtype=bool)
    declared, unresolved, unmeasured = 0, [], []
    for k, p in enumerate(perturbations):
        if target_map is not None and p in target_map:
            stated[k] = True
            gene = target_map[p]
            if gene is None:
                declared += 1
            elif gene in pos:
                out[k] = pos[gene]
            else:
                unmeasured.append(f"{p} -> {gene}")
        elif no_target_genes:
            stated[k] = True
            declared += 1
        elif p in pos:
            out[k] = pos[p]
        else:
            unresolved.append(p)
    if perturbations and (out < 0).all() and declared == 0:
        what = "no perturbation label names a measured gene" if not unmeasured else "no perturbation's target gene is measured"
        raise VcellError(
            f"{what} ({preview(perturbations, 3)}): give --target-genes FILE "
            "(perturbation,gene; target_genes= in Python), or --no-target-genes (no_target_genes=True) when no target is among the genes (drugs, cytokines, or "
            "knockdowns of genes the panel lacks: nothing to exclude)"
        )
    if unresolved:
        log.warning("%d perturbation(s) name no gene; their target gene is not excluded: %s", len(unresolved), preview(unresolved, 5))
    if unmeasured:
        log.warning("target-gene map: %d perturbation(s) map to a gene that is not measured; nothing is excluded for them: %s",
                    len(unmeasured), preview(unmeasured, 5))
    return Targets(out, stated)


def de_targets(targets: np.ndarray, stated: np.ndarray | None, tested: np.ndarray) -> tuple[np.ndarray, bool]:
    """The target genes left out of the DE tables, as cell-eval2 resolves them against the
    reference side's DE table (the genes it ``tested``): a stated target always, one resolved by
    name only if tested. Returns those columns (-1: none) and whether any perturbation resolved
    (stated, or named and tested): with none, cell-eval2 refuses the DE metrics."""
    stated = np.zeros(targets.shape, dtype=bool) if stated is None else stated
    named = (targets >= 0) & ~stated
    named[named] = tested[targets[named]]
    return np.where(stated | named, targets, -1), bool(stated.any() or named.any())


@dataclass
class DESide:
    """One side's DE table as arrays: fold changes, p-values and BH-adjusted p-values."""

    lfc: np.ndarray
    pval: np.ndarray
    padj: np.ndarray

    @property
    def tested(self) -> np.ndarray:
        """The genes the side tests (those its controls express above 5 CPM), as a mask."""
        return ~np.isnan(self.padj).all(axis=0)


def de_side(summary: SideSummary, ctrl: Control, origin: Control) -> DESide:
    """Fold changes against ``origin`` (the reference's controls), tests as summarised, BH within
    each perturbation over the genes ``ctrl`` kept."""
    lfc = fold_changes(summary.cpm_mean, origin.cpm_mean[None, :])
    padj = np.full(summary.pval.shape, np.nan)
    if ctrl.keep.any():
        padj[:, ctrl.keep] = bh_fdr(summary.pval[:, ctrl.keep], axis=-1)
    return DESide(lfc, summary.pval, padj)


@dataclass
class Reference:
    """A reference context summarised once: its controls, its perturbations and their targets."""

    ctrl: Control
    real: SideSummary
    de: DESide
    targets: np.ndarray
    genes: pd.Index
    gene_rank: np.ndarray
    stated: np.ndarray  # Targets.stated

    @property
    def perturbations(self) -> list[str]:
        """The scored perturbations, sorted."""
        return self.real.perturbations


def reference_tasks(real: CountsCells, control: str, perturbations: list[str], prior: dict | None = None):
    """The tasks of a reference's summary (to run with others in one pass): ``(control task, side
    task, finish)``, ``finish(targets)`` (:class:`Targets`) building the :class:`Reference` once they have run.
    ``prior`` (label -> summed counts, controls included), if given, fuses the jackknife in.

    The tasks read the control cells where the reference holds them (one matrix to sweep); the
    :class:`Reference`'s controls are the control store a file read in tiles keeps apart, which
    outlives the reference's matrix (the same cells)."""
    cells, rows = control_rows(real, control)
    here, here_rows = (real, real.rows(control)) if real.controls is not None else (cells, rows)
    ctrl_task = control_task(here, here_rows, None if prior is None else prior[control])
    task = side_task(real, perturbations, (ctrl_task, here, here_rows),
                     None if prior is None else np.vstack([prior[p] for p in perturbations]))

    def finish(targets: Targets) -> Reference:
        ctrl = control_of(ctrl_task, cells, rows)
        summary = summary_of(task, perturbations)
        rank = np.empty(len(real.genes), np.int64)
        rank[np.argsort(np.asarray(real.genes, dtype=str), kind="stable")] = np.arange(len(real.genes))
        return Reference(ctrl, summary, de_side(summary, ctrl, ctrl), targets.cols, real.genes, rank, targets.stated)

    return ctrl_task, task, finish


def summarise_reference(
    real: CountsCells, control: str, perturbations: list[str], targets: Targets, threads: int = 2, engine: Engine | None = None,
) -> Reference:
    """Controls, per-perturbation summaries and DE table of a reference context (``targets``: :func:`resolve_targets`'s)."""
    if not isinstance(targets, Targets):
        raise VcellError(f"targets: give resolve_targets(perturbations, genes, ...)'s Targets, not {type(targets).__name__}")
    ctrl_task, task, finish = reference_tasks(real, control, perturbations)
    run_tasks([ctrl_task, task], engine or Engine(threads))
    return finish(targets)


def score_summaries(
    ref_side: SideSummary, ref_de: DESide, ref_ctrl: Control,
    pred_side: SideSummary, pred_de: DESide, pred_ctrl: Control,
    targets: np.ndarray, gene_rank: np.ndarray, strict: bool = True, where: str = "", stated: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Every per-perturbation metric and the panel ratio, from two summarised sides.

    ``pred_ctrl`` is the control the prediction's effects start from: the reference's own in a
    normal run, each half's own in the replicate anchor. A panel whose corrected effects do not
    sum to a positive number has no ``expr_mse_unbiased_capped_norm``; a panel whose every gene is
    some perturbation's target has no ``pds_cosine``; one where no target resolves among the genes
    the reference's side tests (:func:`de_targets`) has no DE metrics: each an error (as in
    cell-eval2) when ``strict``, else NaN. ``targets`` and ``stated``: :class:`Targets`' arrays.
    """
    real_bulk = bulk_profiles(ref_side.raw_sums)
    pred_bulk = bulk_profiles(pred_side.raw_sums)
    ctrl_bulk = bulk_profiles(ref_ctrl.raw_sums)[0]
    pred_ctrl_bulk = ctrl_bulk if pred_ctrl is ref_ctrl else bulk_profiles(pred_ctrl.raw_sums)[0]
    panel = np.unique(targets[targets >= 0])
    n = len(targets)
    if panel.size < real_bulk.shape[1]:
        values = {"pds_cosine": pds_cosine(pred_bulk - pred_ctrl_bulk, real_bulk - ctrl_bulk, panel)}
    elif strict:
        raise VcellError(f"pds_cosine is undefined{where}: each of the {panel.size} measured genes is some perturbation's target, "
                         "and every target gene is left out of the compared vectors (cell-eval2 refuses such a panel too); "
                         "score it with --no-target-genes, or measure genes beyond the targets")
    else:
        values = {"pds_cosine": np.full(n, np.nan)}
    values.update(expression_errors(pred_bulk, pred_side.jackknife, real_bulk, ref_side.jackknife, ctrl_bulk, ref_ctrl.jackknife, targets))
    cols, resolved = de_targets(targets, stated, ref_de.tested)
    if resolved:
        values.update(de_metrics(ref_de.lfc, ref_de.padj, pred_de.lfc, pred_de.padj, pred_de.pval, gene_rank, cols))
    elif strict:
        raise VcellError(
            f"the DE metrics are undefined{where}: no perturbation's target gene is among the "
            f"{int(ref_de.tested.sum())} genes the reference's DE tests (those its controls express above "
            "5 CPM), so they would exclude nothing (cell-eval2 refuses such a panel too); state the targets with "
            "--target-genes FILE (perturbation,gene), or --no-target-genes when none is a gene")
    else:
        values.update({m: np.full(n, np.nan) for m in DE_METRICS})
    ratio, den = ratio_of_sums(values["expr_mse_unbiased_capped"], values["expr_distance_unbiased"])
    if strict and not np.isfinite(ratio):
        raise VcellError(
            f"expr_mse_unbiased_capped_norm is undefined{where}: the reference's noise-corrected effects "
            f"(expr_distance_unbiased) sum to {den:.4g} <= 0, i.e. its perturbations do not move expression beyond "
            "sampling noise at this depth (cell-eval2 refuses such a panel too); more cells or counts per perturbation "
            "define it, and `vcell bench --profile vcc2026` scores the other five metrics, naming this one degenerate"
        )
    return values, ratio


def evaluate_cells(ref: Reference, pred: CountsCells, threads: int = 2, strict: bool = True,
                   engine: Engine | None = None, prior: dict | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Score a prediction (one context) against a summarised reference (``strict``: see
    :func:`score_summaries`; ``prior``: label -> summed counts of the prediction, if known)."""
    if not pred.genes.equals(ref.genes):
        raise VcellError(f"{pred.where}: genes differ from the reference's")
    sums = None if prior is None else np.vstack([prior[p] for p in ref.perturbations])
    return evaluate_summary(ref, summarise(pred, ref.perturbations, ref.ctrl, threads, engine, sums), strict)


def evaluate_summary(ref: Reference, side: SideSummary, strict: bool = True) -> tuple[dict[str, np.ndarray], float]:
    """Score a summarised prediction against a summarised reference."""
    return score_summaries(ref.real, ref.de, ref.ctrl, side, de_side(side, ref.ctrl, ref.ctrl), ref.ctrl, ref.targets, ref.gene_rank,
                           strict=strict, stated=ref.stated)
