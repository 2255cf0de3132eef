"""One side (real or predicted cells) of a 2025 evaluation read from its file, within a memory budget.

:func:`open_side` reads the file once, by chunks of rows (:mod:`vcell.eval.bands`): the values
are checked as :func:`vcell.eval.inputs.check_pair` checks them (NaN/inf, negatives, counts
against log1p, cell-eval's rules), each cell's total is summed, and the rows are cut into gene
tiles, kept in memory when the matrix fits in the budget, else written to a temporary folder.
Counts are then brought to log1p exactly as cell-eval does with scanpy
(``normalize_total`` to the median library size, then ``log1p``): same float arithmetic, value by
value, applied to each tile as it is read, so the numbers are those of the in-memory path.
A dense matrix that fits the budget is memory-mapped and goes through the in-memory path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.io import read_h5ad, read_h5ad_mapped
from vcell.data.matrix import MatrixStats, in_precision, scan_values
from vcell.data.preprocess_stream import BLOCK_VALUES, Progress, no_progress
from vcell.data.validate import FRACTION_EPS, expression_problems, infer_expression_type
from vcell.errors import VcellError
from vcell.eval._band_kernels import row_totals
from vcell.eval.inputs import INPUT_TYPES, prepare
from vcell.eval.metrics import as_rows
from vcell.eval.row_reader import MatrixReader
from vcell.eval.tiles import Scratch, open_store, plan_tiles, write_stores

log = logging.getLogger(__name__)


@dataclass
class Side:
    """One side ready for the DE: log1p values (an in-memory matrix or a :class:`TileStore`),
    the perturbation labels, the genes, and a reader of rows (for the energy distances)."""

    X: object
    labels: pd.Series
    genes: pd.Index
    where: str
    read_rows: object = None  # callable(rows) -> matrix rows of log1p values
    stores: list = field(default_factory=list)
    expression: str = "log1p"  # what the file held: 'log1p', or 'counts' (normalised to log1p on reading)

    def rows(self, idx: np.ndarray):
        """Rows ``idx`` of the log1p matrix (CSR or dense)."""
        return self.read_rows(idx) if self.read_rows is not None else as_rows(self.X, idx)

    def close(self) -> None:
        """Release the matrix and delete its tiles."""
        for s in self.stores:
            s.close()
        if isinstance(self.read_rows, _FileRows):
            self.read_rows.close()
        self.X = None


def side_from_anndata(adata, pert_col: str, where: str) -> Side:
    """An in-memory, checked, log1p AnnData as a :class:`Side`."""
    return Side(adata.X, adata.obs[pert_col], adata.var_names, where)


class _Scan:
    """The statistics :func:`~vcell.data.matrix.scan_matrix` gives, gathered chunk by chunk
    (:func:`~vcell.data.matrix.scan_values`), with each row's sum (scanpy's counts per cell)."""

    def __init__(self, n_rows: int):
        self.stats = MatrixStats()
        self.sums = np.empty(n_rows, np.float64)

    def add(self, r0: int, r1: int, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> None:
        """Scan rows ``r0:r1`` (a canonical CSR chunk)."""
        vals = data if data.dtype.kind == "f" and data.dtype != np.float16 else data.astype(np.float32)
        row_totals(vals, indptr, self.sums[r0:r1], 0, r1 - r0)
        bad, neg, nonint, frac, vmax, pmax = scan_values(vals, in_precision(FRACTION_EPS, vals.dtype))
        at = lambda k: (r0 + int(np.searchsorted(indptr, k, side="right") - 1), int(indices[k]))  # noqa: E731
        out = self.stats
        out.n_values += int(indptr[-1])
        if bad >= 0 and out.nan is None:
            out.nan = at(bad)
        if neg >= 0 and out.negative is None:
            out.negative = (*at(neg), float(vals[neg]))
        if nonint >= 0:
            out.all_integer = False
            if out.non_integer is None:
                out.non_integer = (*at(nonint), float(vals[nonint]))
        out.has_fraction |= frac >= 0
        if pmax >= 0 and (vmax > out.max_value or out.max_pos is None):
            out.max_value, out.max_pos = float(vmax), at(pmax)


def _store_dtype(dtype: np.dtype) -> np.dtype:
    """float32/float64 kept; float16 and integers (counts, which scanpy casts so) as float32."""
    return np.dtype(dtype) if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _size_factors(totals: np.ndarray, storage: str) -> np.ndarray:
    """scanpy's ``normalize_total`` divisors: each cell's total over the median total (a dense
    matrix takes the median of the non-zero totals, as scanpy does), 1 for a cell without counts."""
    target = np.median(totals[totals > 0]) if storage == "dense" else np.median(totals)
    scale = totals / target
    return scale + (scale == 0)  # allow_divide_by_zero=False


def _scale_log1p(data: np.ndarray, indptr: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``log1p(x / scale[row])`` of CSR values, in place by blocks of rows (elementwise: the same
    values as scanpy's ``normalize_total`` + ``log1p`` on the whole matrix)."""
    if data.dtype != scale.dtype:
        data = data.astype(scale.dtype)
    n, r0 = indptr.size - 1, 0
    while r0 < n:
        r1 = min(n, max(r0 + 1, int(np.searchsorted(indptr, indptr[r0] + BLOCK_VALUES, side="right")) - 1))
        a, b = indptr[r0], indptr[r1]
        np.true_divide(data[a:b], np.repeat(scale[r0:r1], np.diff(indptr[r0 : r1 + 1])), out=data[a:b])
        np.log1p(data[a:b], out=data[a:b])
        r0 = r1
    return data


class _FileRows:
    """Rows of a side's log1p matrix read from its file (the energy distances of a matrix on disk)."""

    def __init__(self, path, kind: str, dtype, col_map: np.ndarray | None, scale: np.ndarray | None):
        self.path, self.kind, self.dtype, self.scale = path, kind, dtype, scale
        self.perm = None if col_map is None else np.argsort(col_map)
        self._meta = None  # the file, opened backed at the first call (one perturbation after another)

    def __call__(self, idx: np.ndarray):
        idx = np.asarray(idx, np.int64)
        if self._meta is None:
            self._meta = read_h5ad(self.path, backed=True)
        X = self._meta.X[idx] if idx.size else self._meta.X[:0]
        perm = self.perm
        if self.kind == "dense":
            X = np.asarray(X, dtype=self.dtype)
            X = X[:, perm] if perm is not None else X
            if self.scale is not None:
                np.true_divide(X, self.scale[idx][:, None], out=X)
                np.log1p(X, out=X)
            return X
        X = sp.csr_matrix(X)  # as stored (not made canonical), as the in-memory path reads it
        X = X.astype(self.dtype) if X.dtype != self.dtype else X
        if perm is not None:
            X = X[:, perm]
        if self.scale is not None:
            X.data = _scale_log1p(X.data, X.indptr.astype(np.int64), self.scale[idx])
        return X

    def close(self) -> None:
        """Close the file."""
        if self._meta is not None:
            self._meta.file.close()
            self._meta = None


def open_side(path: str | os.PathLike, pert_col: str, input_type: str = "auto", genes: pd.Index | None = None,
              budget: float = np.inf, scratch: Scratch | None = None, backed: bool = True, option: str = "--expression",
              progress: Progress = no_progress, name: str = "X", where: str | None = None) -> Side:
    """Read, check and bring to log1p one side of an evaluation (``genes``: the order to follow).

    Parameters
    ----------
    path : path
        The ``.h5ad`` file.
    pert_col : str
        Perturbation column of ``obs``.
    input_type : str
        ``auto``, ``log1p`` or ``counts`` (declared by ``option`` in messages).
    genes : pandas.Index, optional
        Gene order to put the columns in (the same genes, another order).
    budget : float
        Bytes the matrix may take in memory; above it, gene tiles on disk in ``scratch``.
    scratch : Scratch
        Where the tiles go.
    backed : bool
        ``False``: read a dense matrix into memory rather than mapping it (the 2025 ``--in-memory``).
    progress : callable
        Progress line of the pass.
    name : str
        Name of the tile files.
    where : str, optional
        How messages name the file (default: its path).
    """
    if input_type not in INPUT_TYPES:
        raise VcellError(f"{option} {input_type!r}: use one of {', '.join(INPUT_TYPES)}")
    where = str(path) if where is None else where
    reader = MatrixReader(path, where)
    dense_fits = reader.kind == "dense" and reader.n_rows * reader.n_genes * reader.dtype.itemsize <= budget
    if reader.kind is None or dense_fits:  # another layout, or a dense matrix that fits: the in-memory path
        reader.close()
        found: list[str] = []
        adata = prepare(read_h5ad_mapped(path, backed=backed), where, input_type, genes, option, found)
        side = side_from_anndata(adata, pert_col, where)
        side.expression = found[0]
        return side
    try:
        return _tiled_side(reader, pert_col, input_type, genes, budget, scratch, option, progress, name)
    finally:
        reader.close()


def _tiled_side(reader: MatrixReader, pert_col, input_type, genes, budget, scratch, option, progress, name) -> Side:
    meta = read_h5ad(reader.path, backed=True)
    labels = meta.obs[pert_col].copy()
    file_genes, obs_names = meta.var_names.copy(), meta.obs_names.copy()
    meta.file.close()
    col_map = None
    target = file_genes
    if genes is not None and not file_genes.equals(genes):
        col_map = genes.get_indexer(file_genes).astype(np.int64)
        target = genes
    dtype = _store_dtype(reader.dtype)
    total = reader.values() * (dtype.itemsize + 4)
    weights = None
    if total > budget:
        weights = reader.gene_weights()
        if col_map is not None:
            weights = weights[np.argsort(col_map)]
    bounds = plan_tiles(weights if weights is not None else np.ones(reader.n_genes), total, budget)
    store = open_store(reader, bounds, scratch, name, dtype=dtype)
    scan = _Scan(reader.n_rows)
    totals = np.empty(reader.n_rows, np.float64 if dtype == np.float64 else np.float32)

    def on_chunk(r0, r1, parts):
        scan.add(r0, r1, *parts)
        if reader.kind == "dense":  # scanpy sums a dense row with numpy (pairwise, in its dtype)
            totals[r0:r1] = np.asarray(reader.data[r0:r1], dtype=totals.dtype).sum(axis=1)
        else:
            totals[r0:r1] = scan.sums[r0:r1]  # float64 sums in index order, rounded to the data's dtype

    try:
        write_stores(reader, [(store, None)], on_chunk, col_map, progress, f"reading {Path(reader.where).name}")
        names = SimpleNamespace(obs_names=obs_names, var_names=target, uns={})
        declared = None if input_type == "auto" else input_type
        info = infer_expression_type(names, declared, scan.stats, reader.where, cell_eval=True)
        problems = expression_problems(names, scan.stats, info, reader.where, option, cell_eval=True)
        if problems:
            raise VcellError(problems[0].message)
        scale = None
        if info.type == "counts":
            log.info("%s: counts -> normalize_total (median library size) + log1p, as cell-eval does", reader.where)
            scale = _size_factors(totals, reader.kind)
            store.transform(lambda data, indptr: _scale_log1p(data, indptr, scale))
    except BaseException:
        store.close()
        raise
    rows = _FileRows(reader.path, reader.kind, dtype, col_map, scale)
    return Side(store, labels, target, reader.where, rows, stores=[store], expression=info.type)
