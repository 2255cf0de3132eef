"""One side of a VCC 2026 evaluation, reduced to what the metrics read: sums, means and tests.

:func:`summarise` makes one pass over a side's raw counts (blocks of genes on several threads,
band by band for a matrix on disk: :mod:`vcell.eval.vcc2026.engine`) and keeps, per
perturbation: the pseudobulk (summed raw counts), the mean CPM of each gene (counts per million
of the cell's total) and the two-sided Wilcoxon p-value of every gene against the
**reference** control cells, on ``log1p(CPM)``. Only genes whose mean CPM in the reference
controls exceeds :data:`MIN_CONTROL_CPM` are tested: that gene set is one property of the
reference, the same for every perturbation and for both sides. The jackknife sampling
correction of each group (:mod:`vcell.eval.vcc2026.jackknife`) is computed in a second pass.
After this the matrix can be released. :func:`control_task` and :func:`side_task` are the same
work as tasks, for callers that run several summaries in one pass over the tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vcell.errors import VcellError, control_hint
from vcell.eval.tiles import TileStore
from vcell.eval.vcc2026.engine import BULK_TARGET_SUM, CPM, MIN_CONTROL_CPM, Engine, SumsTask, run_tasks
from vcell.eval.vcc2026.inputs import CountsCells

__all__ = ["BULK_TARGET_SUM", "CPM", "MIN_CONTROL_CPM", "Control", "SideSummary", "control_of", "control_task", "side_task",
           "summarise", "summarise_control", "summary_of"]


@dataclass
class Control:
    """The reference control cells (rows ``rows`` of ``cells``): where every effect and test starts from."""

    cells: CountsCells
    rows: np.ndarray
    raw_sums: np.ndarray  # (genes,) float64
    cpm_mean: np.ndarray  # (genes,) float64
    keep: np.ndarray  # (genes,) bool: the tested genes
    jackknife: float

    @property
    def n_cells(self) -> int:
        """Number of control cells."""
        return int(self.rows.size)


@dataclass
class SideSummary:
    """What the metrics need from one side, perturbations in ``perturbations`` order."""

    perturbations: list[str]
    n_cells: np.ndarray  # (P,) int64
    raw_sums: np.ndarray  # (P, genes) float64: pseudobulk counts
    cpm_mean: np.ndarray  # (P, genes) float64
    pval: np.ndarray  # (P, genes) float64, NaN where not tested
    jackknife: np.ndarray  # (P,) float64


def control_rows(cells: CountsCells, control: str) -> tuple[CountsCells, np.ndarray]:
    """The cells holding ``cells``' controls and their rows there: the control store of a file
    read in tiles, else a copy of the control rows (so the rest of the matrix may be released)."""
    where = cells.controls if cells.controls is not None else cells
    rows = where.rows(control)
    if rows.size == 0:
        raise VcellError(f"{cells.where}: no control cells labelled {control!r}{control_hint(control, cells.groups)}")
    if cells.controls is None and not isinstance(cells.X, TileStore):
        where = CountsCells(cells.X[rows], cells.labels[rows], cells.genes, cells.where, [control])
        rows = np.arange(rows.size)
    return where, rows


def control_task(cells: CountsCells, rows: np.ndarray, prior: np.ndarray | None = None) -> SumsTask:
    """The summary of control rows ``rows`` of ``cells``: sums, mean CPM, jackknife (no tests);
    ``prior``: their summed counts if known (see :class:`~vcell.eval.vcc2026.engine.SumsTask`)."""
    return SumsTask(cells, rows, cells, [], keep=None, jack="control", prior=None if prior is None else prior[None, :])


def control_of(task: SumsTask, cells: CountsCells, rows: np.ndarray) -> Control:
    """The :class:`Control` a run :func:`control_task` gave."""
    return Control(cells, rows, task.raw[0], task.cpm[0], task.cpm[0] > MIN_CONTROL_CPM, float(task.jackknife[0]))


def side_task(cells: CountsCells, perturbations: list[str], ctrl: Control | tuple[SumsTask, CountsCells, np.ndarray],
              prior: np.ndarray | None = None, tests: bool = True) -> SumsTask:
    """The summary of ``perturbations``' cells against the controls: a :class:`Control`, or a control
    task of the same run with its cells and rows (the tested genes are then read from it tile by
    tile). ``prior``: the perturbations' summed counts if known, in their order. ``tests=False``:
    no tests (another task gives the p-values: the replicate anchor's halves)."""
    group_rows = []
    for p in perturbations:
        rows = cells.rows(p)
        if rows.size == 0:
            raise VcellError(f"{cells.where}: perturbation {p!r} has no cells")
        group_rows.append(rows)
    n_genes = len(cells.genes)
    full = None if prior is None else np.vstack([np.zeros((1, n_genes)), prior])  # the jackknife of the groups reads rows 1..
    if isinstance(ctrl, Control):
        return SumsTask(ctrl.cells, ctrl.rows, cells, group_rows, keep=ctrl.keep if tests else None, prior=full)
    task, ctrl_cells, rows = ctrl
    return SumsTask(ctrl_cells, rows, cells, group_rows, keep=task if tests else None, prior=full)


def summary_of(task: SumsTask, perturbations: list[str]) -> SideSummary:
    """The :class:`SideSummary` a run :func:`side_task` gave."""
    return SideSummary(list(perturbations), task.sizes[1:].copy(), task.raw[1:], task.cpm[1:], task.pval, task.jackknife)


def summarise_control(real: CountsCells, control: str, threads: int = 2, engine: Engine | None = None) -> Control:
    """The reference's control cells: their pseudobulk, mean CPM, tested genes and jackknife."""
    cells, rows = control_rows(real, control)
    task = control_task(cells, rows)
    run_tasks([task], engine or Engine(threads))
    return control_of(task, cells, rows)


def summarise(cells: CountsCells, perturbations: list[str], ctrl: Control, threads: int = 2, engine: Engine | None = None,
              prior: np.ndarray | None = None) -> SideSummary:
    """One side (the reference or a prediction) against the reference's controls.

    Parameters
    ----------
    cells : CountsCells
        The side's cells; its own control cells, if any, are not used.
    perturbations : list of str
        The perturbations to summarise, each with at least one cell in ``cells``.
    ctrl : Control
        The reference's controls (:func:`summarise_control`).
    threads : int
        Threads for the gene blocks.
    engine : Engine, optional
        Threads, memory budget and progress of the passes (default: ``threads``, no budget).
    prior : numpy.ndarray, optional
        The perturbations' summed counts, if known (the jackknife then needs no pass of its own).

    Returns
    -------
    SideSummary
    """
    task = side_task(cells, perturbations, ctrl, prior)
    run_tasks([task], engine or Engine(threads))
    return summary_of(task, perturbations)
