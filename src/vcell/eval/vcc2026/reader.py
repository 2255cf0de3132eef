"""Reading a raw-count ``.h5ad`` for the VCC 2026 evaluator: the matrix as CSR and a few ``obs`` columns.

The common layouts (``X`` stored as a CSR group or as one dense dataset; ``obs`` columns that
are categorical or plain string/number arrays) are read with h5py alone, which spares the
import of anndata and pandas' frame machinery on the evaluator's critical path; a dense ``X``
is converted to CSR by blocks of rows, never as a whole. Anything else (CSC, zarr, nullable
columns, ...) goes through anndata.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.layout import check_stored_matrices
from vcell.data.preprocess_stream import Progress, no_progress
from vcell.data.spec import DataSpec, column_guess
from vcell.errors import VcellError, lock_hint, preview
from vcell.eval.row_reader import MatrixReader
from vcell.eval.tiles import Scratch, TileStore, open_store, plan_tiles, write_stores
from vcell.eval.vcc2026._kernels import row_stats

log = logging.getLogger(__name__)

#: The perturbation column of a 2026 upload, as ``vcell eval prep --profile vcc2026`` writes it.
UPLOAD_PERT_COL = "target_gene"
#: cell-eval2's context column (absent: one context).
CONTEXT_COLUMN = "context"
#: vcell's data commands' context column: a file scored as one context may hold several there.
DATA_CONTEXT_COLUMN = DataSpec().context_col

_DENSE_BLOCK_ROWS = 2048


@dataclass
class ObsColumns:
    """Some ``obs`` columns of a file, read without its matrix."""

    names: list[str]  # every obs column of the file
    n_obs: int
    columns: dict[str, tuple[np.ndarray, list[str]]]  # name -> (values as object str, group order)


@dataclass
class CountsFile:
    """What the evaluator reads from a file: CSR counts, gene names, the asked ``obs`` columns."""

    X: sp.csr_matrix
    genes: np.ndarray  # str
    obs_names: np.ndarray  # str
    columns: dict[str, tuple[np.ndarray, list[str]]]  # name -> (values as object str, group order)


def _decode(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in a], dtype=object)
    return a.astype(str).astype(object)


def _column(obs: h5py.Group, name: str) -> tuple[np.ndarray, list[str]] | None:
    """(values, group order) of an obs column, or None when its encoding is not a simple one."""
    if name not in obs:
        return None
    node = obs[name]
    kind = node.attrs.get("encoding-type", "")
    if isinstance(node, h5py.Group) and kind == "categorical":
        codes = node["codes"][()].astype(np.int64)
        cats = _decode(node["categories"][()])
        values = np.append(cats, "").astype(object)[np.where(codes >= 0, codes, len(cats))]  # code -1 (missing): ""
        present = set(np.unique(codes[codes >= 0]).tolist())
        return values, [str(c) for i, c in enumerate(cats) if i in present]
    if isinstance(node, h5py.Dataset) and kind in ("string-array", "array", ""):
        values = _decode(node[()])
        return values, sorted(set(values.tolist()) - {""})
    return None


def _csr_from_dense(ds: h5py.Dataset) -> sp.csr_matrix:
    """A dense dataset as CSR, by blocks of rows: one pass counts the non-zeros, the second fills
    arrays of the final size (no block list to concatenate, no dense copy of the whole)."""
    n, m = ds.shape
    counts = np.zeros(n, np.int64)
    for s in range(0, n, _DENSE_BLOCK_ROWS):
        counts[s:s + _DENSE_BLOCK_ROWS] = np.count_nonzero(ds[s:min(n, s + _DENSE_BLOCK_ROWS)], axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    index_dtype = np.int32 if max(int(indptr[-1]), m) < 2**31 - 1 else np.int64
    data = np.empty(int(indptr[-1]), ds.dtype)
    indices = np.empty(int(indptr[-1]), index_dtype)
    for s in range(0, n, _DENSE_BLOCK_ROWS):
        block = ds[s:min(n, s + _DENSE_BLOCK_ROWS)]
        rows, cols = np.nonzero(block)  # row-major order: CSR order
        a, b = indptr[s], indptr[s + block.shape[0]]
        data[a:b] = block[rows, cols]
        indices[a:b] = cols
    return sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, m))


def read_obs(path: str | os.PathLike, columns: list[str]) -> ObsColumns:
    """The ``columns`` of ``obs`` (those present) and the names of all, without reading ``X``."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise VcellError(f"{path}: is a directory, expected an .h5ad file")
    if not p.is_file():
        raise VcellError(f"{path}: file not found")
    try:
        with h5py.File(p, "r") as f:
            if "obs" in f and isinstance(f["obs"], h5py.Group):
                obs = f["obs"]
                names = [str(c) for c in obs.attrs.get("column-order", [k for k in obs.keys() if k != obs.attrs.get("_index", "_index")])]
                cols = {}
                for name in columns:
                    if name in names:
                        col = _column(obs, name)
                        if col is None:
                            raise _Unsupported
                        cols[name] = col
                return ObsColumns(names, len(_index(obs)), cols)
    except _Unsupported:
        pass
    except OSError as exc:
        raise VcellError(f"{path}: not a readable .h5ad file ({exc}){lock_hint(exc)}") from None
    from vcell.data.io import read_h5ad
    meta = read_h5ad(path, backed=True)
    obs = meta.obs.copy()
    meta.file.close()
    return ObsColumns([str(c) for c in obs.columns], obs.shape[0], _frame_columns(obs, columns, path))


def read_counts_file(path: str | os.PathLike, columns: list[str]) -> CountsFile:
    """The matrix (CSR), genes, cell names and ``columns`` of an ``.h5ad``.

    A column absent from ``obs`` is absent from ``CountsFile.columns``.
    """
    try:
        with h5py.File(path, "r") as f:
            check_stored_matrices(path, f)
            return _read_h5py(f, columns)
    except _Unsupported:
        pass
    except OSError as exc:
        raise VcellError(f"{path}: not a readable .h5ad file ({exc}){lock_hint(exc)}") from None
    return _read_anndata(path, columns)


class _Unsupported(Exception):
    pass


@dataclass
class TiledCounts:
    """A file's counts read once into gene tiles: all rows, the control rows apart, the totals."""

    store: TileStore
    controls: TileStore | None
    control_rows: np.ndarray | None
    totals: np.ndarray  # each row's total count (float64)
    bad: tuple | None  # (row, column, value) of the first value that is not a count
    genes: np.ndarray
    group_sums: np.ndarray | None = None  # (groups, genes) summed counts of the groups asked for


def read_tiles(path: str | os.PathLike, control_mask: np.ndarray | None, budget: float, scratch: Scratch | None,
               progress: Progress = no_progress, name: str = "X", bounds: np.ndarray | None = None,
               groups: np.ndarray | None = None) -> TiledCounts | None:
    """Read the matrix of ``path`` once by rows into gene tiles (in memory when the tiles of all
    rows and of the control rows (``control_mask``) fit in ``budget`` bytes, else in ``scratch``),
    summing each row and finding the first value that is not a count on the way; with
    ``groups`` (each row's group, -1: none), each group's summed counts too.

    ``None`` for a layout read otherwise (CSC, no plain gene index): see :func:`read_counts_file`.
    """
    reader = MatrixReader(path)
    try:
        if reader.kind is None or not isinstance(reader.file.get("var"), h5py.Group):
            return None
        try:
            genes = _index(reader.file["var"])
        except _Unsupported:
            return None
        dtype = reader.dtype if reader.dtype.kind in "iu" or reader.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        rows = np.flatnonzero(control_mask).astype(np.int64) if control_mask is not None else None
        share = 1.0 + (rows.size / max(reader.n_rows, 1) if rows is not None else 0.0)
        total = reader.values() * (np.dtype(dtype).itemsize + 4) * share
        if total <= budget:
            bounds = np.array([0, reader.n_genes], np.int64)
        elif bounds is None or len(bounds) < 3:
            bounds = plan_tiles(reader.gene_weights(), total, budget)
        store = open_store(reader, bounds, scratch, name, dtype=dtype, counts=True)
        targets = [(store, None)]
        controls = None
        if rows is not None:
            controls = open_store(reader, bounds, scratch, f"{name}.controls", rows=rows, dtype=dtype, counts=True)
            targets.append((controls, rows))
        totals = np.empty(reader.n_rows, np.float64)
        bad: list = [None]
        n_groups = 0 if groups is None else int(groups.max(initial=-1)) + 1
        sums = [np.zeros((n_groups, reader.n_genes), np.float64) for _ in range(2)]  # one per half of each chunk
        gid = groups if groups is not None else np.empty(0, np.int64)

        def on_chunk(r0, r1, parts):
            data, indices, indptr = parts
            mid = (r1 - r0) // 2
            halves = [(0, mid, sums[0]), (mid, r1 - r0, sums[1])]
            found = list(pool.map(lambda h: row_stats(data, indices, indptr, gid[r0:r1] if n_groups else gid, h[2], totals[r0:r1],
                                                      h[0], h[1]), halves))
            k = next((k for k in found if k >= 0), -1)
            if k >= 0 and bad[0] is None:
                bad[0] = (r0 + int(np.searchsorted(indptr, k, side="right") - 1), int(indices[k]), data[k])

        for store_, _ in targets:
            store_.keep_small = True  # the kernels take counts as uint16: tiles read without conversion
        try:
            with ThreadPoolExecutor(2) as pool:
                write_stores(reader, targets, on_chunk, None, progress, f"reading {os.path.basename(str(path))}")
        except BaseException:
            for store_, _ in targets:
                store_.close()
            raise
        if n_groups:
            sums[0] += sums[1]  # counts: exact in float64, whichever half summed them
        return TiledCounts(store, controls, rows, totals, bad[0], genes, sums[0] if n_groups else None)
    finally:
        reader.close()


def as_csr(X, where: str) -> sp.csr_matrix:
    """``X`` as canonical CSR with float32/float64 (or integer) values, without copying when possible."""
    if X is None:
        raise VcellError(f"{where}: the expression matrix is missing (X is None)")
    if hasattr(X, "to_memory"):  # anndata backed sparse dataset
        X = X.to_memory()
    if not sp.issparse(X):
        X = np.asarray(X)
        if X.ndim != 2:
            raise VcellError(f"{where}: the expression matrix must be 2-D, got shape {X.shape}")
        X = sp.csr_matrix(X.astype(np.float32) if X.dtype == np.float16 else X)  # scipy.sparse has no float16
    elif X.format != "csr":
        X = sp.csr_matrix(X)
    if X.indices.dtype != X.indptr.dtype:  # e.g. int32 columns, int64 row pointers (files written block by block)
        idx = np.int32 if max(X.nnz, X.shape[1]) < np.iinfo(np.int32).max else np.int64
        X = sp.csr_matrix((X.data, X.indices.astype(idx, copy=False), X.indptr.astype(idx, copy=False)), shape=X.shape)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    if X.dtype == np.float16 or X.dtype == np.bool_:
        X = X.astype(np.float32)
    return X


def prediction_pert_col(names, pert_col: str, where: str) -> str:
    """The obs column holding a prediction's perturbations: ``pert_col``, or the upload's
    ``target_gene`` when the prediction has only that (a file written by ``vcell eval prep``,
    scored against a reference whose column has another name); the switch is logged."""
    if pert_col not in names and UPLOAD_PERT_COL in names:
        log.info("%s: no %r column; its perturbations are read from %r, the column of a 2026 upload", where, pert_col,
                 UPLOAD_PERT_COL)
        return UPLOAD_PERT_COL
    return pert_col


def labels_of(obs: pd.DataFrame, pert_col: str, where: str) -> tuple[np.ndarray, list[str]]:
    """The perturbation label of every cell as an object array of str (missing labels become ''),
    and the labels in pandas' group order (a categorical's categories, else sorted)."""
    if pert_col not in obs.columns:
        hint = column_guess(pert_col, obs.columns, "perturbation")
        raise VcellError(f"{where}: perturbation column {pert_col!r} not found in obs{hint} (columns: {preview(obs.columns, 20)})")
    col = obs[pert_col]
    labels = np.asarray(col.astype(object).where(col.notna(), "").astype(str), dtype=object)
    present = set(labels) - {""}
    if isinstance(col.dtype, pd.CategoricalDtype):
        order = [str(c) for c in col.cat.categories if str(c) in present]
    else:
        order = sorted(present)
    return labels, order




def _index(group: h5py.Group) -> np.ndarray:
    key = group.attrs.get("_index", "_index")
    if key not in group or not isinstance(group[key], h5py.Dataset):
        raise _Unsupported
    return _decode(group[key][()])


def _read_h5py(f: h5py.File, columns: list[str]) -> CountsFile:
    if "X" not in f or "obs" not in f or "var" not in f:
        raise _Unsupported
    obs, var, x = f["obs"], f["var"], f["X"]
    cols = {}
    for name in columns:
        if name in obs:
            col = _column(obs, name)
            if col is None:
                raise _Unsupported
            cols[name] = col
    genes, obs_names = _index(var), _index(obs)
    if isinstance(x, h5py.Group):
        if x.attrs.get("encoding-type") != "csr_matrix":
            raise _Unsupported
        shape = tuple(int(v) for v in x.attrs["shape"])
        X = sp.csr_matrix((x["data"][()], x["indices"][()], x["indptr"][()]), shape=shape)
    elif isinstance(x, h5py.Dataset) and x.ndim == 2:
        X = _csr_from_dense(x)
    else:
        raise _Unsupported
    return CountsFile(X, genes, obs_names, cols)


def _frame_columns(obs: pd.DataFrame, columns: list[str], path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The ``columns`` of an ``obs`` frame that exist, as (labels, group order)."""
    return {name: labels_of(obs, name, str(path)) for name in columns if name in obs.columns}


def _read_anndata(path, columns: list[str]) -> CountsFile:
    from vcell.data.io import read_h5ad
    adata = read_h5ad(path)
    cols = _frame_columns(adata.obs, columns, path)
    return CountsFile(as_csr(adata.X, str(path)), np.asarray(adata.var_names, dtype=object),
                      np.asarray(adata.obs_names, dtype=object), cols)
