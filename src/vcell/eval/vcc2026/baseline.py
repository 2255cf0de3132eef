"""The baseline end of the VCC 2026 scale: the context's mean perturbation response.

The generic profile is the equal-weight mean, over the reference's perturbations, of each
perturbation's mean count vector; at a perturbation's own target gene that perturbation is left
out of the mean (a knockdown is not a generic response). The baseline prediction gives every
perturbation this profile, with the reference's cell count and cell-to-cell spread: each
predicted cell is a reference control cell drawn at random (``numpy.random.default_rng(seed)``,
perturbations in sorted order, seed 0 as cell-eval2) with every gene scaled by
``profile / control mean`` and stored as float32, the procedure of ``cell-eval2 baseline``. It
is then scored as an ordinary prediction.

The predicted cells are never built: they are the reference's control cells, drawn (with
repeats) and scaled gene by gene, so :func:`baseline_summary` summarises the control cells
themselves with that column scale (:class:`~vcell.eval.vcc2026.engine.SumsTask`), the values
rounded to float32 as the emitted matrix holds them; the drawn cells' totals are summed first,
gene tile after gene tile in gene order (:class:`~vcell.eval.vcc2026.engine.TotalsTask`). No
matrix of the baseline's size is ever held.
"""

from __future__ import annotations

import numpy as np

from vcell.errors import VcellError
from vcell.eval.vcc2026.engine import Engine, MeansTask, SumsTask, TotalsTask, run_tasks
from vcell.eval.vcc2026.evaluate import Reference
from vcell.eval.vcc2026.inputs import CountsCells
from vcell.eval.vcc2026.summary import SideSummary, summary_of

#: cell-eval2's default seed of the baseline's control draws.
BASELINE_SEED = 0


def profile_task(real: CountsCells, perturbations: list[str]) -> MeansTask:
    """The task of each perturbation's mean counts (run it with the reference's other tasks)."""
    return MeansTask(real, [real.rows(p) for p in perturbations])


def profile_from_means(means: np.ndarray, ref: Reference, where: str = "") -> np.ndarray:
    """The mean perturbation response from each perturbation's mean counts (rows in ``ref.perturbations`` order)."""
    total = np.zeros(means.shape[1], np.float64)
    for m in means:
        total += m
    count = np.full(total.size, float(len(means)))
    for m, col in zip(means, ref.targets, strict=True):
        if col >= 0:
            total[col] -= m[col]
            count[col] -= 1.0
    if (count <= 0).any():
        gene = ref.genes[int(np.flatnonzero(count <= 0)[0])]
        raise VcellError(f"{where}: gene {gene!r} is the target of every perturbation; the mean response has no value there")
    return total / count


def control_mean_task(ref: Reference) -> MeansTask:
    """The task of the reference controls' mean counts (run it with the reference's other tasks)."""
    return MeansTask(ref.ctrl.cells, [ref.ctrl.rows])


def baseline_summary(profile: np.ndarray, ref: Reference, sizes: dict[str, int], seed: int = BASELINE_SEED,
                     engine: Engine | None = None, ctrl_mean: np.ndarray | None = None) -> SideSummary:
    """The baseline prediction summarised as :func:`~vcell.eval.vcc2026.summary.summarise` would
    summarise its emitted cells: ``sizes[p]`` control cells drawn for each perturbation ``p``
    (``numpy.random.default_rng(seed)``, perturbations sorted) and scaled gene by gene to the profile.
    ``ctrl_mean``: the controls' mean counts, if already known (:func:`control_mean_task`)."""
    ctrl = ref.ctrl
    cells, rows = ctrl.cells, ctrl.rows
    if ctrl_mean is None:
        means = control_mean_task(ref)
        run_tasks([means], engine, "baseline")
        ctrl_mean = means.means[0]
    zero = ctrl_mean <= 0
    scale = np.where(zero, 0.0, profile / np.where(zero, 1.0, ctrl_mean))
    rng = np.random.default_rng(seed)
    drawn = {p: rows[rng.integers(0, rows.size, size=sizes[p])] for p in sorted(ref.perturbations)}
    groups = [drawn[p] for p in ref.perturbations]
    totals = TotalsTask(cells, rows, scale, groups)  # the drawn cells' totals and pseudobulks: one pass
    run_tasks([totals], engine, "baseline")
    b_totals = np.zeros(len(cells.labels), np.float64)
    b_totals[rows] = totals.totals  # a drawn cell's total is its control cell's, scaled
    task = SumsTask(cells, rows, cells, groups, keep=ctrl.keep, colscale=scale, b_totals=b_totals, prior=totals.sums)
    task.where = "the mean-response baseline"
    run_tasks([task], engine, "baseline")
    return summary_of(task, ref.perturbations)
