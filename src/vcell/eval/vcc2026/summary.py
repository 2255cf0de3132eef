"""One side of a VCC 2026 evaluation, reduced to what the metrics read: sums, means and tests.

:func:`summarise` makes one pass over a side's raw counts (blocks of genes on several threads)
and keeps, per perturbation: the pseudobulk (summed raw counts), the mean CPM of each gene
(counts per million of the cell's total) and the two-sided Wilcoxon p-value of every gene
against the **reference** control cells, on ``log1p(CPM)``. Only genes whose mean CPM in the
reference controls exceeds :data:`MIN_CONTROL_CPM` are tested: that gene set is one property of
the reference, the same for every perturbation and for both sides. The jackknife sampling
correction of each group (:mod:`vcell.eval.vcc2026.jackknife`) is computed in the same call.
After this the matrix can be released.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vcell.errors import VcellError
from vcell.eval.de import _n_threads
from vcell.eval.vcc2026._kernels import counts_chunk
from vcell.eval.vcc2026.inputs import CountsCells
from vcell.eval.vcc2026.jackknife import jackknife_corrections

#: Genes are tested when their mean CPM in the reference controls is above this (5 CPM).
MIN_CONTROL_CPM = 5.0
#: CPM scale of the Wilcoxon values (counts per million).
CPM = 1e6
#: Total of the pseudobulk profiles (``bulk_target_sum``).
BULK_TARGET_SUM = 5e4


@dataclass
class Control:
    """The reference control cells: where every effect and every test starts from."""

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


#: Non-zeros a gene block gathers (float64 each, per thread): bounds the kernel's working memory.
_BLOCK_VALUES = 8_000_000


def _blocks(n_genes: int, threads: int, nnz: float) -> list[tuple[int, int]]:
    """Gene blocks: at least four per thread (load balance), each gathering at most about
    :data:`_BLOCK_VALUES` non-zeros (memory), 16 to 1024 genes."""
    size = -(-n_genes // (4 * max(threads, 1)))
    if nnz > 0:
        size = min(size, int(n_genes * _BLOCK_VALUES / nnz))
    size = int(min(1024, max(16, size)))
    return [(j0, min(n_genes, j0 + size)) for j0 in range(0, n_genes, size)]


def _run_blocks(ctrl: CountsCells, ctrl_rows, cells: CountsCells, group_rows, keep, threads: int):
    """The kernel over gene blocks: (raw sums, cpm sums, pvals) for [control] + groups."""
    n_genes = cells.X.shape[1]
    sizes = np.array([len(ctrl_rows)] + [len(r) for r in group_rows], dtype=np.int64)
    if (sizes == 0).any():
        raise VcellError("a group without cells reached the tests")  # callers only pass non-empty groups
    order = np.concatenate([np.asarray(ctrl_rows, np.int64), *[np.asarray(r, np.int64) for r in group_rows]])
    gptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    inv_n = 1.0 / sizes.astype(np.float64)
    n_g1 = sizes.size
    stat = np.zeros((n_g1 - 1, n_genes), np.float64)
    pval = np.full((n_g1 - 1, n_genes), np.nan)
    raw = np.zeros((n_g1, n_genes), np.float64)
    cpm = np.zeros((n_g1, n_genes), np.float64)
    A, B = ctrl.X, cells.X
    div0, div1 = ctrl.totals / CPM, cells.totals / CPM

    def work(block):
        j0, j1 = block
        return counts_chunk(A.data, A.indices, A.indptr, div0, B.data, B.indices, B.indptr, div1,
                            order, gptr, sizes, keep, j0, j1, stat, pval, raw, cpm, inv_n)

    n_threads = _n_threads(threads)
    nnz = A.nnz * len(ctrl_rows) / max(A.shape[0], 1) + B.nnz * (order.size - len(ctrl_rows)) / max(B.shape[0], 1)
    blocks = _blocks(n_genes, n_threads, nnz)
    if n_threads == 1 or len(blocks) == 1:
        bad = [work(b) for b in blocks]
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            bad = list(pool.map(work, blocks))
    if any(bad):
        raise VcellError(f"{cells.where}: the expression matrix contains NaN values")
    return raw, cpm, pval


def summarise_control(real: CountsCells, control: str, threads: int = 2) -> Control:
    """The reference's control cells: their pseudobulk, mean CPM, tested genes and jackknife."""
    rows = real.rows(control)
    if rows.size == 0:
        raise VcellError(f"{real.where}: no control cells labelled {control!r}")
    cells = CountsCells(real.X[rows], real.labels[rows], real.genes, real.where, [control])  # its own copy: the rest may go
    rows = np.arange(rows.size)
    none = np.zeros(cells.X.shape[1], dtype=np.bool_)
    raw, cpm, _ = _run_blocks(cells, rows, cells, [], none, threads)
    keep = cpm[0] > MIN_CONTROL_CPM
    jack = jackknife_corrections(cells.X, cells.totals, [rows], raw[:1], BULK_TARGET_SUM, threads)[0]
    return Control(cells, rows, raw[0], cpm[0], keep, float(jack))


def summarise(cells: CountsCells, perturbations: list[str], ctrl: Control, threads: int = 2) -> SideSummary:
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

    Returns
    -------
    SideSummary
    """
    group_rows = []
    for p in perturbations:
        rows = cells.rows(p)
        if rows.size == 0:
            raise VcellError(f"{cells.where}: perturbation {p!r} has no cells")
        group_rows.append(rows)
    raw, cpm, pval = _run_blocks(ctrl.cells, ctrl.rows, cells, group_rows, ctrl.keep, threads)
    jack = jackknife_corrections(cells.X, cells.totals, group_rows, raw[1:], BULK_TARGET_SUM, threads)
    return SideSummary(
        perturbations=list(perturbations),
        n_cells=np.array([len(r) for r in group_rows], dtype=np.int64),
        raw_sums=raw[1:],
        cpm_mean=cpm[1:],
        pval=pval,
        jackknife=jack,
    )
