"""The VCC 2026 evaluator's passes over the counts, gene band by gene band.

A **task** is one reduction of a matrix's cells to per-gene numbers: :class:`SumsTask` (the
pseudobulk, mean CPM, Wilcoxon tests and jackknife of groups of cells against control cells),
:class:`MeansTask` (scipy's mean counts per group, for the baseline's profile) or
:class:`TotalsTask` (the baseline's cell totals). Every gene's numbers come from that gene's
values alone (and the cells' totals), so the tasks run tile by tile over the gene tiles of the
matrices (:mod:`vcell.eval.bands`): :func:`run_tasks` sweeps the tiles once per **phase**
(``totals``, then ``counts``, then ``jack``: the jackknife needs each group's complete
pseudobulk), each band read once for all the tasks of the phase, in list order (a task
testing genes reads the genes its control task kept on the same tile). A matrix in memory is
one tile: the same code, one band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError
from vcell.eval._de_engine import _map, _n_threads, block_bounds
from vcell.eval.bands import sweep
from vcell.eval.tiles import TileStore
from vcell.eval.vcc2026._kernels import counts_chunk, log1p_table, mean_counts, scaled_sums, scaled_totals
from vcell.eval.vcc2026.jackknife import Jackknife

#: Genes are tested when their mean CPM in the reference controls is above this (5 CPM).
MIN_CONTROL_CPM = 5.0
#: CPM scale of the Wilcoxon values (counts per million).
CPM = 1e6
#: Total of the pseudobulk profiles (``bulk_target_sum``).
BULK_TARGET_SUM = 5e4
#: Non-zeros a gene block gathers (float64 each, per thread): bounds the kernel's working memory.
_BLOCK_VALUES = 8_000_000
_NO_SCALE = np.empty(0, np.float64)
_NO_BOUNDS = np.empty((0, 0), np.int64)
_NO_TABLE = np.empty((0, 0), np.float64)
#: Most bytes of precomputed row bounds per store and tile (beyond, each block searches its rows).
_MAX_BOUNDS = 256_000_000


@dataclass
class Engine:
    """How the passes run: threads, the memory budget of the bands (bytes), a progress callback."""

    threads: int = 2
    budget: float = math.inf
    progress: Progress = field(default=no_progress)


def store_of(cells) -> TileStore:
    """The tiles of a :class:`~vcell.eval.vcc2026.inputs.CountsCells` (a CSR in memory is one tile), or a store itself."""
    if isinstance(cells, TileStore):
        return cells
    X = cells.X
    return X if isinstance(X, TileStore) else TileStore.from_csr(X)


def _blocks(j0: int, j1: int, threads: int, nnz: float) -> np.ndarray:
    """Bounds of the gene blocks of ``j0:j1``: at least four per thread (load balance), each
    gathering at most about :data:`_BLOCK_VALUES` non-zeros (``nnz``: those of the tile), 16 to
    1024 genes."""
    n = j1 - j0
    size = -(-n // (4 * max(threads, 1)))
    if nnz > 0:
        size = min(size, int(n * _BLOCK_VALUES / nnz))
    size = int(min(1024, max(16, size)))
    return np.array([*range(j0, j1, size), j1], np.int64)


def _visits(group_rows: list[np.ndarray], first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, group)`` of every cell of the groups (group ``first + g`` for ``group_rows[g]``),
    group after group, each in the order given (that of its sums). Visiting one group at a time
    keeps the kernels' writes on one group's regions (about 30% faster than the cells in storage
    order, whose groups interleave)."""
    if not group_rows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = np.concatenate(group_rows).astype(np.int64, copy=False)
    grp = np.repeat(np.arange(first, first + len(group_rows), dtype=np.int64), [r.size for r in group_rows])
    return rows, grp


class Tile:
    """One gene tile of a sweep: its genes ``j0:j1``, each store's arrays, the gene blocks of its
    work and, on demand, each row's slice at the block bounds (one walk per row and store)."""

    def __init__(self, j0: int, j1: int, parts: dict, stores: list[TileStore], threads: int):
        self.j0, self.j1, self.parts = j0, j1, parts
        nnz = 0.0
        for s in stores:
            values = parts[id(s)][0].size
            nnz = max(nnz, values * (j1 - j0) / max(s.n_genes, 1) if s.n_tiles == 1 else values)
        self.blocks = _blocks(j0, j1, threads, nnz)
        self.threads = threads
        self._bounds: dict = {}

    def row_bounds(self, store: TileStore) -> np.ndarray:
        """``[row, i]``: the first entry of ``row`` at or after gene ``blocks[i]`` (empty when too large to hold).

        Found once per matrix in memory: stores wrapping the same arrays (the replicate
        anchor's 44 tasks each wrap the reference's CSR) share them, which the tile's parts,
        held as long as the tile, make safe to key by address."""
        parts = self.parts[id(store)]
        key = tuple((a.ctypes.data, a.size) for a in parts[1:])
        if key not in self._bounds:
            n = store.n_rows
            self._bounds[key] = block_bounds(parts, self.blocks, self.threads) if n * self.blocks.size * 8 <= _MAX_BOUNDS else _NO_BOUNDS
        return self._bounds[key]


class SumsTask:
    """Groups of rows of ``B`` against control rows of ``A``: sums, mean CPM, tests, jackknife.

    Group 0 is ``ctrl_rows`` of ``A``, group ``g >= 1`` is ``group_rows[g - 1]`` of ``B`` (rows in
    the given order, possibly repeated). ``keep`` chooses the tested genes: ``None`` (none: a
    control summary, or groups another task tests), a boolean array, or the control
    :class:`SumsTask` run before this one on each tile (genes whose mean CPM there exceeds
    :data:`MIN_CONTROL_CPM`). ``jack`` says whose
    jackknife to compute: ``"control"`` (group 0), ``"groups"`` (the others) or ``None``.
    ``colscale`` scales ``B``'s values gene by gene and ``b_totals`` replaces its cell totals
    (the baseline's cells: control cells scaled). ``prior``, the groups' summed counts known
    beforehand (summed while the file was read: exact for counts), lets the jackknife run in
    the same pass as the tests (checked against the sums the pass finds; if they differ, the
    jackknife takes a pass of its own).
    """

    def __init__(self, A, ctrl_rows, B, group_rows, keep=None, jack: str | None = "groups",
                 colscale: np.ndarray | None = None, b_totals: np.ndarray | None = None, prior: np.ndarray | None = None):
        self.A, self.B, self.where = store_of(A), store_of(B), B.where
        self.sizes = np.array([len(ctrl_rows)] + [len(r) for r in group_rows], dtype=np.int64)
        if (self.sizes == 0).any():
            raise VcellError("a group without cells reached the tests")  # callers only pass non-empty groups
        self.ctrl_rows = np.asarray(ctrl_rows, np.int64)
        self.group_rows = [np.asarray(r, np.int64) for r in group_rows]
        self.rows0, self.grp0 = _visits([self.ctrl_rows])
        self.rows1, self.grp1 = _visits(self.group_rows, first=1)
        self.inv_n = 1.0 / self.sizes.astype(np.float64)
        n_g1, n_genes = self.sizes.size, self.A.n_genes
        self.raw = np.zeros((n_g1, n_genes), np.float64)
        self.cpm = np.zeros((n_g1, n_genes), np.float64)
        self.pval = np.full((n_g1 - 1, n_genes), np.nan)
        self._stat = np.zeros((n_g1 - 1, n_genes), np.float64)
        self._keep_task = keep if isinstance(keep, SumsTask) else None
        self.keep = np.zeros(n_genes, np.bool_) if keep is None or self._keep_task is not None else np.asarray(keep, np.bool_)
        self.a_totals = A.totals
        self.b_totals = B.totals if b_totals is None else b_totals
        self.div0, self.div1 = self.a_totals / CPM, self.b_totals / CPM
        self.colscale = _NO_SCALE if colscale is None else np.asarray(colscale, np.float64)
        # log1p(CPM) of small counts looked up per visited row (a control summary tests nothing;
        # the baseline's scaled values are not counts)
        tests = keep is not None
        self.table0 = log1p_table(self.rows0, self.div0) if tests else _NO_TABLE
        self.table1 = log1p_table(self.rows1, self.div1) if tests and colscale is None else _NO_TABLE
        self.jack_on = jack
        self.jackknife: np.ndarray | None = None
        self._jack: Jackknife | None = None
        self.prior = prior
        self.phases = ("counts",) if prior is not None else ("counts", "jack")
        if prior is not None:
            self._setup_jack(prior)

    @property
    def stores(self) -> list[TileStore]:
        """The matrices read."""
        return [self.A] if self.A is self.B else [self.A, self.B]

    def nbytes(self) -> int:
        """Bytes of the results held."""
        return (self.raw.size + self.cpm.size + self.pval.size * 2 + self.table0.size + self.table1.size) * 8

    def counts(self, tile: Tile, threads: int) -> None:
        """Sums, mean CPM and tests of the tile's genes."""
        if self._keep_task is not None:
            self.keep[tile.j0:tile.j1] = self._keep_task.cpm[0, tile.j0:tile.j1] > MIN_CONTROL_CPM
        (a_data, a_idx, a_ptr), rb0 = tile.parts[id(self.A)], tile.row_bounds(self.A)
        (b_data, b_idx, b_ptr), rb1 = tile.parts[id(self.B)], tile.row_bounds(self.B)

        def work(i):
            j0, j1 = tile.blocks[i], tile.blocks[i + 1]
            return counts_chunk(a_data, a_idx, a_ptr, self.div0, self.rows0, self.grp0, rb0,
                                b_data, b_idx, b_ptr, self.div1, self.rows1, self.grp1, rb1, i,
                                self.sizes, self.keep, j0, j1, self._stat, self.pval, self.raw, self.cpm, self.inv_n, self.colscale,
                                self.table0, self.table1)

        if any(_map(work, list(range(tile.blocks.size - 1)), threads)):
            raise VcellError(f"{self.where}: the expression matrix contains NaN values")
        if self.prior is not None:
            self.jack(tile, threads)

    def start_jack(self) -> None:
        """The pseudobulks are complete: set up the jackknife."""
        self._stat = None
        self.table0 = self.table1 = _NO_TABLE
        self._setup_jack(self.raw)

    def _setup_jack(self, raw: np.ndarray) -> None:
        if self.jack_on == "control":
            self._jack = Jackknife([self.ctrl_rows], raw[:1], self.a_totals, BULK_TARGET_SUM)
        elif self.jack_on == "groups":
            self._jack = Jackknife(self.group_rows, raw[1:], self.b_totals, BULK_TARGET_SUM, self.colscale)

    def prior_held(self) -> bool:
        """Whether the sums given beforehand are those the pass found (the fused jackknife is then valid)."""
        rows = slice(0, 1) if self.jack_on == "control" else slice(1, None)
        return self.prior is not None and np.array_equal(self.prior[rows], self.raw[rows])

    def jack(self, tile: Tile, threads: int) -> None:
        """The jackknife sums of the tile's genes."""
        if self._jack is not None:
            store = self.A if self.jack_on == "control" else self.B
            self._jack.tile(*tile.parts[id(store)], tile.j0, tile.j1, threads)

    def finish(self) -> None:
        """The corrections, once every tile is done."""
        self.table0 = self.table1 = _NO_TABLE
        if self._jack is not None:
            self.jackknife = self._jack.result()
            self._jack = None


class _OneStoreTask:
    """A task reading one matrix, ``A``, into one array of results, ``result``."""

    A: TileStore
    result: np.ndarray

    @property
    def stores(self) -> list[TileStore]:
        """The matrices read."""
        return [self.A]

    def nbytes(self) -> int:
        """Bytes of the results held."""
        return self.result.size * 8


class MeansTask(_OneStoreTask):
    """scipy's mean count of each gene over each group of rows of ``cells`` (sum of ``x * (1/n)`` in row order)."""

    phases = ("counts",)

    def __init__(self, cells, group_rows):
        self.A = store_of(cells)
        sizes = np.array([len(r) for r in group_rows], dtype=np.int64)
        self.rows, self.grp = _visits([np.asarray(r, np.int64) for r in group_rows])
        self.inv_n = 1.0 / np.maximum(sizes, 1).astype(np.float64)
        self.means = self.result = np.zeros((sizes.size, self.A.n_genes), np.float64)

    def counts(self, tile: Tile, threads: int) -> None:
        """The means of the tile's genes."""
        (data, idx, ptr), rb = tile.parts[id(self.A)], tile.row_bounds(self.A)
        _map(lambda i: mean_counts(data, idx, ptr, self.rows, self.grp, self.inv_n, tile.blocks[i], tile.blocks[i + 1], self.means, rb, i),
             list(range(tile.blocks.size - 1)), threads)


class TotalsTask(_OneStoreTask):
    """Each of ``rows`` of ``cells`` summed over its values scaled by ``colscale``, in gene order;
    with ``group_rows`` (rows of ``cells``, in order, repeats allowed), each group's scaled sums too."""

    phases = ("totals",)

    def __init__(self, cells, rows, colscale: np.ndarray, group_rows: list[np.ndarray] | None = None):
        self.A, self.rows = store_of(cells), np.asarray(rows, np.int64)
        self.colscale = np.asarray(colscale, np.float64)
        self.totals = self.result = np.zeros(self.rows.size, np.float64)
        self.sums = None
        if group_rows is not None:
            self.g_rows, self.g_grp = _visits([np.asarray(r, np.int64) for r in group_rows], first=1)
            self.sums = np.zeros((len(group_rows) + 1, self.A.n_genes), np.float64)  # row 0: the controls' place

    def totals_phase(self, tile: Tile, threads: int) -> None:
        """Add the tile's genes (tiles come in gene order: each row is summed in index order)."""
        data, idx, ptr = tile.parts[id(self.A)]
        cuts = np.linspace(0, self.rows.size, _n_threads(threads) + 1).astype(np.int64)

        def work(i):
            scaled_totals(data, idx, ptr, self.rows[cuts[i]:cuts[i + 1]], self.colscale, tile.j0, tile.j1,
                          self.totals[cuts[i]:cuts[i + 1]], _NO_BOUNDS, 0)

        _map(work, list(range(len(cuts) - 1)), threads)
        if self.sums is not None:  # the groups' sums, the groups split between threads
            edges = np.searchsorted(self.g_grp, np.linspace(1, self.sums.shape[0], _n_threads(threads) + 1))
            _map(lambda i: scaled_sums(data, idx, ptr, self.g_rows[edges[i]:edges[i + 1]], self.g_grp[edges[i]:edges[i + 1]],
                                       self.colscale, tile.j0, tile.j1, self.sums), list(range(len(edges) - 1)), threads)


def run_tasks(tasks: list, engine: Engine | None = None, what: str = "summaries") -> None:
    """Run ``tasks``: one sweep over the gene tiles per phase (``totals``, ``counts``, ``jack``)."""
    engine = engine or Engine()
    threads = _n_threads(engine.threads)
    for phase, method in (("totals", "totals_phase"), ("counts", "counts"), ("jack", "jack")):
        todo = [t for t in tasks if phase in t.phases]
        if phase == "jack":
            for t in tasks:
                if getattr(t, "prior", None) is not None:
                    if t.prior_held():
                        t.finish()
                    else:  # not counts after all: the jackknife again, from the sums found
                        todo.append(t)
            for t in todo:
                t.start_jack()
        if not todo:
            continue
        stores = list({id(s): s for t in todo for s in t.stores}.values())
        for ranges, parts in sweep(stores, engine.budget, engine.progress, f"{what}: {phase}"):
            for i, (j0, j1) in enumerate(ranges):
                tile = Tile(j0, j1, {id(s): parts[k][i] for k, s in enumerate(stores)}, stores, threads)
                for t in todo:
                    getattr(t, method)(tile, threads)
        if phase == "jack":
            for t in todo:
                t.finish()
