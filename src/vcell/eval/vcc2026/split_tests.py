"""The replicate anchor's halves, several splits summarised and tested in one task.

Each half of a split needs what a side of an evaluation needs: its control summary and its
perturbations' (:func:`~vcell.eval.vcc2026.summary.control_task`,
:func:`~vcell.eval.vcc2026.summary.side_task`). :class:`SplitsTask` computes the sums, mean CPM,
tested genes and tests of every half in one pass over the values
(:func:`~vcell.eval.vcc2026._split_kernels.split_sums_chunk`, then
:func:`~vcell.eval.vcc2026._split_kernels.split_tests_chunk`), instead of one pass per half,
and hands them to those tasks, which then only compute their jackknife. The replicate anchor uses it
for passes of at least :data:`~vcell.eval.vcc2026.anchor.FUSED_MIN_SPLITS` splits.
"""

from __future__ import annotations

import numpy as np

from vcell.errors import VcellError
from vcell.eval._de_engine import _map
from vcell.eval.vcc2026._kernels import log1p_table
from vcell.eval.vcc2026._split_kernels import split_sums_chunk, split_tests_chunk
from vcell.eval.vcc2026.engine import CPM, MIN_CONTROL_CPM, SumsTask, Tile, _visits, store_of
from vcell.eval.vcc2026.inputs import CountsCells


class SplitsTask:
    """The halves ``halves`` (per split, its halves A and B) of ``real``: the control ``control``
    and the perturbations ``perturbations`` (each with at least two cells) of each half, summed,
    and the perturbations tested against the half's own controls.

    Half ``h = 2 s + c`` is half ``c`` of split ``s``: ``raw[h]`` and ``cpm[h]`` (group 0: the
    control) and ``pval[h]`` are what that half's own tasks would compute, bit for bit.
    """

    phases = ("counts",)

    def __init__(self, real: CountsCells, control: str, perturbations: list[str], halves: list[tuple[CountsCells, CountsCells]]):
        self.A, self.where = store_of(real), real.where
        n_rows, n_genes = len(real.labels), len(real.genes)
        self.codes = np.full((n_rows, len(halves)), -1, np.int8)
        for s, pair in enumerate(halves):
            for c, half in enumerate(pair):
                self.codes[half.labels != "", s] = c
        group_rows = [real.rows(g) for g in [control, *perturbations]]
        self.n_half = np.array([r.size // 2 for r in group_rows], np.int64)
        self.inv_n = 1.0 / self.n_half.astype(np.float64)
        self.rows, self.grp = _visits([np.asarray(r, np.int64) for r in group_rows])
        self.div = real.totals / CPM
        self.table = log1p_table(self.rows, self.div)
        n_h, n_g1 = 2 * len(halves), self.n_half.size
        self.raw = np.zeros((n_h, n_g1, n_genes), np.float64)
        self.cpm = np.zeros((n_h, n_g1, n_genes), np.float64)
        self.keep = np.zeros((n_h, n_genes), np.bool_)
        self.pval = np.full((n_h, n_g1 - 1, n_genes), np.nan)

    def lend(self, h: int, ctrl_task: SumsTask, side_task: SumsTask) -> None:
        """Give half ``h``'s control and side tasks (made for it) their sums and tests; they then
        only compute their jackknife, after this task's pass."""
        ctrl_task.raw, ctrl_task.cpm = self.raw[h, :1], self.cpm[h, :1]
        side_task.raw, side_task.cpm, side_task.pval = self.raw[h], self.cpm[h], self.pval[h]
        for t in (ctrl_task, side_task):
            t.phases = ("jack",)

    @property
    def stores(self) -> list:
        """The matrix read."""
        return [self.A]

    def nbytes(self) -> int:
        """Bytes of the results held."""
        return (self.raw.size + self.cpm.size + self.pval.size + self.table.size) * 8

    def counts(self, tile: Tile, threads: int) -> None:
        """The sums and tests of the tile's genes in every half."""
        (data, idx, ptr), rb = tile.parts[id(self.A)], tile.row_bounds(self.A)

        def work(i):  # the sums first: a half's tested genes come from its controls' means
            j0, j1 = tile.blocks[i], tile.blocks[i + 1]
            lo, hi = np.empty(self.rows.size, np.int64), np.empty(self.rows.size, np.int64)
            cnt = np.zeros((self.n_half.size, j1 - j0), np.int64)
            nan_seen = split_sums_chunk(data, idx, ptr, self.div, self.rows, self.grp, rb, i, self.codes, self.inv_n,
                                        MIN_CONTROL_CPM, j0, j1, self.raw, self.cpm, self.keep, lo, hi, cnt)
            split_tests_chunk(data, idx, self.rows, self.grp, lo, hi, self.div, self.table, self.codes, self.n_half,
                              self.keep, j0, j1, self.pval, cnt)
            return nan_seen

        if any(_map(work, list(range(tile.blocks.size - 1)), threads)):
            raise VcellError(f"{self.where}: the expression matrix contains NaN values")
