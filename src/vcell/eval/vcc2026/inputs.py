"""Raw-count inputs of the VCC 2026 evaluator: reading, the checks the challenge applies, targets.

Counts are declared, never guessed: a matrix must hold finite, non-negative, integral values
with no cell above :data:`MAX_COUNTS_PER_CELL`, or the run stops with one line naming the
file, the cell and the gene. Both sides share one gene axis, in the same order (a
submission must follow the reference's). The prediction's own control cells are never used:
the reference's controls are the origin of both sides, as the competition scores.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.layout import check_stored_matrices
from vcell.data.preprocess_stream import Progress, no_progress
from vcell.data.validate import check_unique_genes
from vcell.errors import VcellError, control_hint, did_you_mean, named_with_guess, preview
from vcell.eval._band_kernels import row_totals
from vcell.eval.tiles import Scratch, TileStore
from vcell.eval.vcc2026.reader import as_csr, labels_of, read_counts_file, read_obs, read_tiles

log = logging.getLogger(__name__)
_NO_ROWS = np.empty(0, np.int64)

#: The challenge's cap on one cell's total count (``max_counts_per_cell``).
MAX_COUNTS_PER_CELL = 1e6


@dataclass
class CountsCells:
    """One side's cells: raw counts (canonical CSR, or gene tiles of a file: a
    :class:`~vcell.eval.tiles.TileStore`), one label per row, library sizes.

    ``controls``, for a file read in tiles, holds its control cells in a store of their own.
    """

    X: sp.csr_matrix | TileStore
    labels: np.ndarray
    genes: pd.Index
    where: str
    group_order: list[str] | None = None  # the labels in the file's group order (categories, else sorted)
    totals: np.ndarray | None = None  # each row's total count (float64)
    controls: CountsCells | None = None
    source_rows: np.ndarray | None = None  # for a control store: the rows of the file it holds
    group_sums: np.ndarray | None = None  # summed counts of the groups read_cells was asked for

    def __post_init__(self) -> None:
        self.bad = None  # (row, column, value) of the first value that is not a count
        self._groups = None
        if self.totals is None:
            if isinstance(self.X, TileStore):
                raise ValueError("cells in tiles come with their totals")
            self.totals, first = _totals(self.X)
            if first >= 0:
                self.bad = (int(np.searchsorted(self.X.indptr, first, side="right") - 1), int(self.X.indices[first]), self.X.data[first])
        if self.group_order is None:
            self.group_order = sorted(set(self.labels) - {""})

    def rows(self, label: str) -> np.ndarray:
        """Row indices of the cells labelled ``label``, in row order (empty if none)."""
        return self.groups.get(label, _NO_ROWS)

    @property
    def groups(self) -> dict[str, np.ndarray]:
        """label -> its rows in row order, indexed once (labels are compared as objects only here)."""
        if self._groups is None:
            names, codes = np.unique(self.labels.astype(str), return_inverse=True)
            order = np.argsort(codes, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=names.size))])
            self._groups = {str(n): order[bounds[i]:bounds[i + 1]] for i, n in enumerate(names) if n != ""}
        return self._groups


def _totals(X: sp.csr_matrix) -> tuple[np.ndarray, int]:
    """Row totals and the first non-count value of a CSR matrix, rows split over two threads."""
    n = X.shape[0]
    out = np.empty(n, np.float64)
    cuts = [0, n // 2, n]
    with ThreadPoolExecutor(2) as pool:
        bad = list(pool.map(lambda i: row_totals(X.data, X.indptr, out, cuts[i], cuts[i + 1]), range(2)))
    found = [b for b in bad if b >= 0]
    return out, (min(found) if found else -1)


def check_counts(cells: CountsCells, max_per_cell: float = MAX_COUNTS_PER_CELL, first_row: int = 0) -> None:
    """Stop at the first value that is not a raw count, or a cell above ``max_per_cell``.

    The values were scanned when ``cells`` was made (with its row totals); cells made from
    another's totals inherit that check. ``first_row``: the file row of ``cells``' first row
    (cells read a block at a time), so that errors name the file's row.

    Raises
    ------
    VcellError
        Naming the file, the cell (obs name or row) and the gene of the first bad value.
    """
    if cells.bad is not None:  # found while the row totals were summed
        row, col, value = cells.bad
        gene = cells.genes[col]
        what = "not finite" if not np.isfinite(value) else "negative" if value < 0 else "not an integer"
        hint = (" (log-normalised values, or expected counts? a prediction's counts are integral draws: "
                "`vcell predict --output counts`, `vcell.to_counts` in Python)") if what == "not an integer" else ""
        raise VcellError(
            f"{cells.where}: value {float(value)!r} at row {row + first_row} (a {cells.labels[row]!r} cell), gene {gene!r} is {what}; "
            f"the vcc2026 profile scores raw counts{hint}"
        )
    over = np.flatnonzero(cells.totals > max_per_cell)
    if over.size:
        row = int(over[0])
        raise VcellError(
            f"{cells.where}: cell {row + first_row} ({cells.labels[row]!r}) holds {cells.totals[row]:,.0f} counts, more than "
            f"the {max_per_cell:,.0f} allowed per cell ({over.size} such cell(s))"
        )


def check_genes(pred_genes: pd.Index, real_genes: pd.Index, pred_where: str, real_where: str) -> None:
    """The prediction must carry the reference's genes, in the reference's order."""
    check_unique_genes(real_genes, real_where)
    if pred_genes.equals(real_genes):
        return
    missing = real_genes.difference(pred_genes, sort=False)
    extra = pred_genes.difference(real_genes, sort=False)
    if len(missing):
        raise VcellError(f"{pred_where}: {len(missing)} gene(s) of {real_where} missing from var ({preview(missing, 5)})")
    if len(extra):
        raise VcellError(f"{pred_where}: {len(extra)} gene(s) not in {real_where} ({preview(extra, 5)})")
    check_unique_genes(pred_genes, pred_where)
    first = int(np.flatnonzero(np.asarray(pred_genes) != np.asarray(real_genes))[0])
    raise VcellError(
        f"{pred_where}: genes are in another order than in {real_where} (position {first}: {pred_genes[first]!r}, "
        f"expected {real_genes[first]!r}); a vcc2026 submission follows the reference's gene order "
        "(`vcell eval prep --profile vcc2026 --genes LIST` writes a prediction in a list's order)"
    )


def refuse_unlabelled(labels: np.ndarray, where) -> np.ndarray:
    """``labels`` (missing ones read as ``''``), unless a cell has none: an error, never a cell dropped in silence."""
    blank = np.flatnonzero(np.asarray(labels, dtype=object) == "")
    if blank.size:
        raise VcellError(f"{where}: {blank.size:,} cell(s) without a perturbation label (first: cell {int(blank[0])}); "
                         "label them or leave them out")
    return labels


def check_perturbations(pred_labels: np.ndarray, real_labels: np.ndarray, control: str, pred_where: str, real_where: str) -> list[str]:
    """The perturbations to score (the reference's, sorted); both sides must hold the same set.

    The prediction's control cells, if any, are allowed and ignored.
    """
    real_set = set(real_labels) - {control, ""}
    if control not in set(real_labels):
        raise VcellError(f"{real_where}: no control cells labelled {control!r}{control_hint(control, real_set)}; "
                         "the reference's controls are the origin of every metric")
    if not real_set:
        raise VcellError(f"{real_where}: no perturbed cells besides the controls {control!r}")
    pred_set = set(pred_labels) - {control, ""}
    missing = sorted(real_set - pred_set)
    extra = sorted(pred_set - real_set)
    if missing and extra:  # misspelled labels: name the first with what they may have meant
        hints = ", ".join(named_with_guess(e, missing) for e in extra[:3])
        raise VcellError(f"{pred_where}: {len(extra)} perturbation label(s) not in {real_where} ({hints}); "
                         f"{len(missing)} of its perturbation(s) have no predicted cells ({preview(missing, 5)})")
    if missing:
        raise VcellError(f"{pred_where}: {len(missing)} perturbation(s) of {real_where} have no predicted cells ({preview(missing, 5)})")
    if extra:
        raise VcellError(f"{pred_where}: {len(extra)} perturbation(s) not in {real_where} ({preview(extra, 5)})")
    return sorted(real_set)


def cells_from_anndata(adata, pert_col: str, where: str, layer: str | None = None) -> CountsCells:
    """An in-memory AnnData's raw counts (``X`` or ``layers[layer]``) as checked :class:`CountsCells`."""
    labels, order = labels_of(adata.obs, pert_col, where)
    refuse_unlabelled(labels, where)
    if layer is not None:
        from vcell.eval.inputs import from_layer  # the file path stays free of anndata's import

        adata = from_layer(adata, layer, where)
    X = adata.X
    cells = CountsCells(as_csr(X, where), labels, adata.var_names.copy(), where, order)
    try:
        check_counts(cells)
    except VcellError as exc:
        if layer is None and "counts" in adata.layers:  # scanpy's layout: log1p in X, the counts kept beside it
            raise VcellError(f"{exc}; layers['counts'] holds the raw counts? pass layer='counts'") from None
        raise
    return cells


def read_cells(path: str | os.PathLike, pert_col: str, control: str | None = None, budget: float = np.inf,
               scratch: Scratch | None = None, progress: Progress = no_progress, name: str = "X",
               bounds: np.ndarray | None = None, groups: np.ndarray | None = None) -> CountsCells:
    """Read an ``.h5ad`` of raw counts as :class:`CountsCells` (matrix checked).

    The matrix is read once by rows into gene tiles (:mod:`vcell.eval.bands`): in memory when it
    fits in ``budget`` bytes, else in ``scratch`` (cut at ``bounds`` when given: the tiles of
    another file it is swept with). With ``control``, the control cells are also kept in a store
    of their own (``controls``), what the predictions are scored against. With ``groups`` (each
    row's group, -1: none), ``group_sums`` holds each group's summed counts (none for a layout
    read with anndata).
    """
    where = str(path)
    meta = read_obs(path, [pert_col])  # the column is checked before the matrix is read
    if pert_col not in meta.columns:
        hint = did_you_mean(pert_col, meta.names)
        raise VcellError(f"{where}: perturbation column {pert_col!r} not found in obs{hint} (columns: {preview(meta.names, 20)})")
    labels, order = meta.columns[pert_col]
    check_stored_matrices(path)  # a corrupt sparse matrix would be read without a word (or crash a kernel)
    mask = (labels == control) if control is not None else None
    tiled = read_tiles(path, mask, budget, scratch, progress, name, bounds, groups)
    if tiled is None:  # a layout read with anndata, into memory
        f = read_counts_file(path, [pert_col])
        labels, order = f.columns[pert_col]
        cells = CountsCells(as_csr(f.X, where), labels, pd.Index(f.genes), where, order)
    else:
        def matrix(store):  # in memory: a plain CSR matrix
            return store if store.on_disk else store.to_csr()

        cells = CountsCells(matrix(tiled.store), labels, pd.Index(tiled.genes), where, order, tiled.totals)
        cells.bad = tiled.bad
        cells.group_sums = tiled.group_sums
        if tiled.controls is not None:
            rows = tiled.control_rows
            cells.controls = CountsCells(matrix(tiled.controls), labels[rows], cells.genes, where, None, tiled.totals[rows],
                                         source_rows=rows)
    try:
        check_unique_genes(cells.genes, where)  # a scale built on a panel no prediction can be scored against
        check_counts(cells)
    except VcellError as exc:
        close_cells(cells)
        elsewhere = other_matrices(path)
        if elsewhere and "not an integer" in str(exc):  # scanpy's and Seurat's layout: the counts kept beside log1p X
            raise VcellError(f"{exc}; the file also holds {', '.join(elsewhere)}: if those are the raw counts, put them in X "
                             f"({counts_in_x(elsewhere[0])}) and write it anew") from None
        raise
    return cells


def counts_in_x(where: str) -> str:
    """The line of Python that puts the counts of ``where`` (``layers['NAME']`` or ``raw.X``) in ``X``."""
    return "adata = adata.raw.to_adata()" if where == "raw.X" else f"adata.X = adata.{where}"


def other_matrices(path: str | os.PathLike) -> list[str]:
    """The matrices of an ``.h5ad`` besides ``X`` where counts may be kept: ``layers['NAME']`` and ``raw.X``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layers = [f"layers[{name!r}]" for name in f["layers"]] if "layers" in f else []
            return sorted(layers, key=lambda n: "counts" not in n) + (["raw.X"] if "raw" in f and "X" in f["raw"] else [])
    except (OSError, KeyError, TypeError):
        return []


def close_cells(cells: CountsCells) -> None:
    """Release a side's matrix (and delete its tiles on disk)."""
    for c in (cells, cells.controls):
        if c is not None and isinstance(c.X, TileStore):
            c.X.close()


def read_target_map(path: str | os.PathLike, perturbations: list[str]) -> dict[str, str | None]:
    """A perturbation -> target gene table (CSV with two columns, header row); an empty gene means none.

    A listed perturbation that is not among ``perturbations`` (the reference's) but close to one
    without a row of its own is warned of as a likely typo: that one falls back to the
    label-names-a-gene rule. Other unused rows (a map of a whole screen scored on some of it) are fine.
    """
    p = Path(path)
    if not p.is_file():
        raise VcellError(f"{p}: target-gene map not found")
    table = pd.read_csv(p, dtype=str, keep_default_na=False)
    if table.shape[1] < 2:
        raise VcellError(f"{p}: a target-gene map needs two columns (perturbation, gene), found {table.shape[1]}")
    mapping: dict[str, str | None] = {}
    for pert, gene in zip(table.iloc[:, 0], table.iloc[:, 1], strict=True):
        if pert in mapping:
            raise VcellError(f"{p}: perturbation {pert!r} is listed twice")
        mapping[pert] = gene or None
    known = set(perturbations)
    unmapped = [q for q in perturbations if q not in mapping]
    typos = []
    for q in (q for q in mapping if q not in known):
        if hint := did_you_mean(q, unmapped):
            typos.append(f"{q!r}{hint}")
            if len(typos) == 5:  # enough to say it; a map keyed otherwise throughout need not be walked whole
                break
    if typos:
        log.warning("%s: row(s) naming no perturbation of the reference, so unused, that look like typos: %s", p, "; ".join(typos))
    return mapping
