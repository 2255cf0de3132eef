"""The replicate end of the VCC 2026 scale: the reference scored against itself, split in half.

Each split draws, per group of cells (every perturbation and the control, in the reference's
group order), a random permutation and gives its first ``n // 2`` cells to half A and the
next ``n // 2`` to half B (an odd group's last cell is unused; a group of one cell leaves
both halves). Half A plays the reference and half B the prediction, each with **its own**
control cells, so the two sides are not correlated through a shared control. Seeds are
cell-eval2's: ``numpy.random.SeedSequence(base_seed).generate_state(n_splits)``, one
``numpy.random.default_rng(seed)`` per split, base seed 0 and 5 splits by default, so the
halves, and therefore the numbers, are the same as cell-eval2's.

The fold-change error is the one metric with another estimator: its gate (significant genes
with a finite fold change, at least 10) and its denominator come from the **full** reference's
DE table, only the two fold-change vectors from the halves, so its cohort is the metric's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vcell.errors import VcellError
from vcell.eval.vcc2026.engine import Engine, run_tasks
from vcell.eval.vcc2026.evaluate import DESide, Reference, de_side, de_targets, score_summaries
from vcell.eval.vcc2026.inputs import CountsCells
from vcell.eval.vcc2026.metrics import ALPHA, MIN_LFC_GATE, SCORED
from vcell.eval.vcc2026.split_tests import SplitsTask
from vcell.eval.vcc2026.summary import SideSummary, control_of, control_task, side_task, summary_of
from vcell.eval.vcc2026.tables import RATIO_METRIC

#: cell-eval2's defaults.
BASE_SEED = 0
N_SPLITS = 5
NMAE = "de_wilcoxon_lfc_nmae"


def split_seeds(base_seed: int = BASE_SEED, n_splits: int = N_SPLITS) -> list[int]:
    """The seed of each split, as cell-eval2 derives them."""
    if n_splits < 1:
        raise VcellError(f"--splits must be at least 1, got {n_splits}")
    return [int(s) for s in np.random.SeedSequence(int(base_seed)).generate_state(n_splits)]


def halves(cells: CountsCells, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of half A and half B for one split (groups in ``cells.group_order``)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for label in cells.group_order:
        perm = rng.permutation(cells.rows(label))
        h = perm.size // 2
        if h:
            a.append(perm[:h])
            b.append(perm[h:2 * h])
    if not a:
        raise VcellError(f"{cells.where}: no group has two cells; the replicate anchor cannot split it")
    return np.concatenate(a), np.concatenate(b)


def _half(cells: CountsCells, rows: np.ndarray) -> CountsCells:
    """The cells ``rows`` of ``cells`` without copying the matrix: other rows get no label."""
    labels = np.full(cells.labels.shape, "", dtype=object)
    labels[rows] = cells.labels[rows]
    return CountsCells(cells.X, labels, cells.genes, cells.where, cells.group_order, cells.totals)


def _full_gate_nmae(ref: Reference, lfc_a: np.ndarray, avail_a: np.ndarray, lfc_b: np.ndarray, avail_b: np.ndarray,
                    rows_of: np.ndarray) -> np.ndarray:
    """Per reference perturbation: the fold-change error of half B against half A on the full gate."""
    out = np.full(len(ref.perturbations), np.nan)
    if not de_targets(ref.targets, ref.stated, ref.de.tested)[1]:
        return out  # the reference's DE resolves no target: no DE metric (score_summaries), this one neither
    for t, k in enumerate(rows_of):
        if k < 0:
            continue
        gate = ref.de.padj[t] < ALPHA
        gate &= np.isfinite(ref.de.lfc[t]) & ~np.isnan(ref.de.padj[t])
        if ref.targets[t] >= 0:
            gate[ref.targets[t]] = False
        if gate.sum() < MIN_LFC_GATE:
            continue
        a = np.where(avail_a[k, gate], lfc_a[k, gate], 0.0)
        b = np.where(avail_b[k, gate], lfc_b[k, gate], 0.0)
        a = np.where(np.isfinite(a), a, 0.0)
        real = ref.de.lfc[t, gate]
        d = np.abs(real).mean()
        if np.isfinite(d) and d != 0.0:
            out[t] = float(np.abs(np.where(np.isfinite(b), b, 0.0) - a).mean()) / float(d)
    return out


@dataclass
class AnchorResult:
    """Per-split aggregates (long) and their mean over splits (one row per metric)."""

    splits: pd.DataFrame
    agg: pd.DataFrame


def split_aggregates(values: dict[str, np.ndarray], ratio: float) -> dict[str, tuple[float, int | None]]:
    """metric -> (mean over perturbations skipping NaN, number of values), the ratio metric too."""
    out: dict[str, tuple[float, int | None]] = {}
    for m, v in values.items():
        ok = v[~np.isnan(v)]
        out[m] = (float(ok.mean()) if ok.size else math.nan, int(ok.size))
    out[RATIO_METRIC] = (ratio, None)
    return out


#: Most bytes of half summaries one pass holds: more splits than that are run in several passes.
ANCHOR_RESULT_BYTES = 1e9
#: Splits in one pass from which their halves are summed and tested together (:class:`SplitsTask`):
#: its pass costs about what one split's halves cost in their own passes, plus a little per split
#: (measured at 123,000 cells x 2,000 genes: 4.0 s for one split against 2.4 s, 4.2 against 4.6
#: for two, within noise, 4.3 against 7.0 for three, 4.9 against 11.3 for five).
FUSED_MIN_SPLITS = 3


class AnchorPlan:
    """The splits of a replicate anchor: their halves drawn now, their summaries made as tasks
    (:mod:`vcell.eval.vcc2026.engine`) a few splits at a time, then scored.

    A perturbation of one cell cannot be split: an error when ``strict`` (as in cell-eval2), else
    it is left out of the anchor; an undefined panel ratio in a split likewise (see
    :func:`~vcell.eval.vcc2026.evaluate.score_summaries`).
    """

    def __init__(self, real: CountsCells, control: str, perturbations: list[str], base_seed: int = BASE_SEED,
                 n_splits: int = N_SPLITS, strict: bool = True):
        single = [p for p in perturbations if real.rows(p).size < 2]
        if single and strict:
            raise VcellError(
                f"{real.where}: {len(single)} perturbation(s) have a single cell ({', '.join(map(repr, single[:3]))}); "
                "the replicate anchor splits every group in two halves"
            )
        self.real, self.control, self.perturbations, self.strict = real, control, list(perturbations), strict
        self.seeds = split_seeds(base_seed, n_splits)
        self.halves = []
        for seed in self.seeds:
            pair = []
            for rows in halves(real, seed):
                half = _half(real, rows)
                if control not in half.groups:
                    raise VcellError(f"{real.where}: the control group has fewer than two cells; the replicate anchor cannot split it")
                pair.append(half)
            self.halves.append(pair)
        self._tasks: dict[int, list] = {}
        self._rows: list[dict] = []

    def groups(self, budget: float = math.inf) -> list[list[int]]:
        """Splits run together: their half summaries take at most ``min(budget / 2, ANCHOR_RESULT_BYTES)``."""
        n_genes = len(self.real.genes)
        per_split = 2 * 4 * 8 * (len(self.perturbations) + 2) * n_genes
        k = max(1, int(min(budget / 2, ANCHOR_RESULT_BYTES) // per_split))
        ids = list(range(len(self.seeds)))
        return [ids[i:i + k] for i in range(0, len(ids), k)]

    def tasks(self, splits: list[int]) -> list:
        """The tasks of ``splits``: each half's control summary and its perturbations' (sums,
        means, tests, jackknife). From :data:`FUSED_MIN_SPLITS` splits on, one
        :class:`~vcell.eval.vcc2026.split_tests.SplitsTask` sums and tests every half in one pass
        over the values and the halves' tasks only compute their jackknife (same bits)."""
        tested = [p for p in self.perturbations if self.real.rows(p).size >= 2]  # those in every half
        fused = None
        if len(splits) >= FUSED_MIN_SPLITS:
            fused = SplitsTask(self.real, self.control, tested, [self.halves[i] for i in splits])
        out = [] if fused is None else [fused]
        for k, i in enumerate(splits):
            pair = []
            for c, half in enumerate(self.halves[i]):
                rows = half.rows(self.control)
                ctrl_task = control_task(half, rows)
                side = side_task(half, tested, (ctrl_task, half, rows), tests=fused is None)
                if fused is not None:
                    fused.lend(2 * k + c, ctrl_task, side)
                pair.append((ctrl_task, side, half, rows, tested))
                out += [ctrl_task, side]
            self._tasks[i] = pair
        return out

    def score(self, ref: Reference, splits: list[int]) -> None:
        """Score ``splits`` once their tasks have run (and let their summaries go)."""
        for i in splits:
            sides = []
            for ctrl_task, task, half, rows, perts in self._tasks.pop(i):
                ctrl = control_of(ctrl_task, half, rows)
                side = summary_of(task, perts)
                sides.append((side, ctrl, de_side(side, ctrl, ctrl)))
            self._score_split(ref, i, sides)

    def _score_split(self, ref: Reference, i: int, sides) -> None:
        seed = self.seeds[i]
        (sa, ca, da), (sb, cb, db) = sides
        keep = [p for p in sa.perturbations if p in set(sb.perturbations)]
        ia = [sa.perturbations.index(p) for p in keep]
        ib = [sb.perturbations.index(p) for p in keep]
        idx = [ref.perturbations.index(p) for p in keep]
        targets = ref.targets[idx]
        stated = ref.stated[idx]
        sa_k, sb_k = _take(sa, ia), _take(sb, ib)
        da_k, db_k = _take_de(da, ia), _take_de(db, ib)
        values, ratio = score_summaries(sa_k, da_k, ca, sb_k, db_k, cb, targets, ref.gene_rank, strict=self.strict,
                                        where=f" in anchor split {i + 1} (seed {seed})", stated=stated)
        rows_of = np.full(len(ref.perturbations), -1, dtype=np.int64)
        rows_of[idx] = np.arange(len(keep))
        nmae = _full_gate_nmae(ref, da_k.lfc, ~np.isnan(da_k.padj), db_k.lfc, ~np.isnan(db_k.padj), rows_of)
        values[NMAE] = nmae[~np.isnan(nmae)]
        for metric, (value, n) in sorted(split_aggregates(values, ratio).items()):
            self._rows.append({"split_index": i, "seed": seed, "metric": metric, "value": value, "n_perturbations": n})

    def result(self) -> AnchorResult:
        """The per-split aggregates and their mean over splits (every split scored)."""
        splits = pd.DataFrame(sorted(self._rows, key=lambda r: r["split_index"]))
        splits["n_perturbations"] = splits["n_perturbations"].astype("Int64")
        agg = []
        for metric, group in splits.groupby("metric", sort=True):
            v = group.sort_values("split_index")["value"].to_numpy(dtype=np.float64)
            n = group["n_perturbations"].dropna()
            agg.append({
                "metric": metric, "replicate": float(math.fsum(v) / v.size), "replicate_sd": float(np.std(v, ddof=0)),
                "replicate_min": float(v.min()), "replicate_max": float(v.max()),
                "n_perturbations_min": int(n.min()) if len(n) else None, "n_perturbations_max": int(n.max()) if len(n) else None,
                "estimator": "full_gate_raw" if metric == NMAE else "split_half_raw",
            })
        agg = pd.DataFrame(agg)
        for col in ("n_perturbations_min", "n_perturbations_max"):
            agg[col] = agg[col].astype("Int64")
        return AnchorResult(splits, agg)


def replicate_anchor(ref: Reference, real: CountsCells, control: str, base_seed: int = BASE_SEED,
                     n_splits: int = N_SPLITS, threads: int = 2, progress=None, strict: bool = True,
                     engine: Engine | None = None) -> AnchorResult:
    """The replicate anchor of a reference context (``real`` holds its cells).

    ``progress``, when given, is called with the split index after each split. See
    :class:`AnchorPlan` for ``strict``; ``engine`` runs the passes (default: in memory).
    """
    engine = engine or Engine(threads)
    plan = AnchorPlan(real, control, ref.perturbations, base_seed, n_splits, strict)
    for group in plan.groups(engine.budget):
        run_tasks(plan.tasks(group), engine, "replicate anchor")
        plan.score(ref, group)
        if progress is not None:
            for i in group:
                progress(i)
    return plan.result()


def _take(side, idx):
    return SideSummary([side.perturbations[i] for i in idx], side.n_cells[idx], side.raw_sums[idx], side.cpm_mean[idx],
                       side.pval[idx], side.jackknife[idx])


def _take_de(de, idx):
    return DESide(de.lfc[idx], de.pval[idx], de.padj[idx])


__all__ = ["AnchorPlan", "AnchorResult", "BASE_SEED", "N_SPLITS", "SCORED", "halves", "replicate_anchor", "split_seeds"]
