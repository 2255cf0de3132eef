"""The replicate anchor's halves summarised and tested together (:class:`SplitsTask`): the same
bits as each half summarised and tested on its own, ties of every kind included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.eval.vcc2026.anchor import AnchorPlan
from vcell.eval.vcc2026.engine import Engine, run_tasks
from vcell.eval.vcc2026.inputs import CountsCells
from vcell.eval.vcc2026.split_tests import SplitsTask
from vcell.eval.vcc2026.summary import control_task, side_task

CONTROL = "ctrl"


def _tied_counts(seed: int) -> CountsCells:
    """Counts built for ties: most cells padded to one library size (so equal counts give equal
    ``log1p(CPM)``, within a group, between a group and the controls, and in the gaps between
    control values), the rest at their own sizes; an odd control group (a cell left out of each
    split), groups of 1 (never tested), 2, 3, 17 and 30 cells; a gene no control expresses; a
    gene whose every perturbed value lies above the controls'."""
    rng = np.random.default_rng(seed)
    sizes = {CONTROL: 41, "p1": 1, "p2": 2, "p3": 3, "p17": 17, "p30": 30}
    labels = np.concatenate([[g] * n for g, n in sizes.items()])
    rng.shuffle(labels)
    n, n_genes = labels.size, 40
    X = rng.poisson(rng.uniform(0.2, 4.0, n_genes), size=(n, n_genes)).astype(np.float32)
    ctrl = labels == CONTROL
    X[ctrl, 1] = 0
    X[~ctrl, 1] = rng.poisson(2.0, (~ctrl).sum())
    X[ctrl, 2] = rng.integers(0, 3, ctrl.sum())
    X[~ctrl, 2] = rng.integers(5, 8, (~ctrl).sum())
    pad = rng.random(n) < 0.7
    X[pad, -1] = 400 - X[pad, :-1].sum(axis=1)  # the last gene pads to 400 counts
    assert (X >= 0).all()
    return CountsCells(sp.csr_matrix(X), labels.astype(object), pd.Index([f"g{j}" for j in range(n_genes)]), "tied.h5ad",
                       list(sizes))


@pytest.mark.parametrize("seed", [0, 1])
def test_every_half_gets_the_numbers_its_own_pass_gives(seed):
    """Sums, mean CPM, tested genes and p-values of every half of five splits: bit-identical to
    each half's own control and side tasks (the path the anchor took before), and ties really
    occur between a group and the controls and within groups."""
    real = _tied_counts(seed)
    perts = [p for p in real.group_order if p != CONTROL]
    plan = AnchorPlan(real, CONTROL, perts, base_seed=seed, n_splits=5, strict=False)
    tested = [p for p in perts if real.rows(p).size >= 2]
    task = SplitsTask(real, CONTROL, tested, plan.halves)
    run_tasks([task], Engine(threads=2))

    with_ctrl = in_gaps = 0
    for s, pair in enumerate(plan.halves):
        for c, half in enumerate(pair):
            rows = half.rows(CONTROL)
            ctrl = control_task(half, rows)
            side = side_task(half, tested, (ctrl, half, rows))
            run_tasks([ctrl, side], Engine(threads=1))
            h = 2 * s + c
            np.testing.assert_array_equal(task.raw[h], side.raw)
            np.testing.assert_array_equal(task.cpm[h], side.cpm)
            np.testing.assert_array_equal(task.raw[h, :1], ctrl.raw)
            np.testing.assert_array_equal(task.cpm[h, :1], ctrl.cpm)
            np.testing.assert_array_equal(task.keep[h], ctrl.cpm[0] > 5.0)
            assert np.array_equal(task.pval[h], side.pval, equal_nan=True), f"split {s} half {'AB'[c]}"
            assert np.isfinite(side.pval).any() and np.isnan(side.pval).any()  # some genes tested, some not
            ctrl_cpm = _nonzero_cpm(real, rows)
            for p in tested:
                cpm = _nonzero_cpm(real, half.rows(p))
                with_ctrl += np.isin(cpm, ctrl_cpm).sum()
                in_gaps += (cpm.size - np.unique(cpm).size) - (np.isin(cpm, ctrl_cpm).sum() - np.isin(np.unique(cpm), ctrl_cpm).sum())
    assert with_ctrl > 1000 and in_gaps > 50


def _nonzero_cpm(real: CountsCells, rows: np.ndarray) -> np.ndarray:
    """The non-zero ``count / total`` of ``rows``, gene by gene (gene ``j`` offset by ``j``)."""
    X = real.X[rows].toarray().astype(np.float64)
    v = X / real.totals[rows][:, None] + np.arange(X.shape[1])
    return v[X > 0]


def test_the_anchor_runs_its_halves_in_one_pass_over_the_values(monkeypatch):
    """The anchor's tasks for a group of three splits: one :class:`SplitsTask` sums and tests
    every half; the halves' own tasks only compute their jackknife from what it lent them. A
    group of two (where the fused pass does not pay) runs each half's own tests."""
    from vcell.eval.vcc2026 import split_tests

    calls = []
    real_split = split_tests.split_tests_chunk
    monkeypatch.setattr(split_tests, "split_tests_chunk", lambda *a: calls.append(a[11]) or real_split(*a))
    real = _tied_counts(3)
    perts = [p for p in real.group_order if p not in (CONTROL, "p1")]
    plan = AnchorPlan(real, CONTROL, perts, n_splits=5)
    pairs = plan.tasks([3, 4])
    assert len(pairs) == 8 and not any(isinstance(t, SplitsTask) for t in pairs)
    assert all("counts" in t.phases for t in pairs)
    tasks = plan.tasks([0, 1, 2])
    (fused,) = [t for t in tasks if isinstance(t, SplitsTask)]
    halves = [t for t in tasks if t is not fused]
    assert len(halves) == 12 and all(t.phases == ("jack",) for t in halves)
    run_tasks(tasks, Engine(threads=1))
    assert calls and calls[0] == 0  # the fused kernel ran, from the first gene on
    sides = halves[1::2]
    assert all(np.shares_memory(t.pval, fused.pval) and np.shares_memory(t.raw, fused.raw) for t in sides)
    assert all(np.isfinite(t.jackknife).all() and (t.jackknife > 0).any() for t in halves)
