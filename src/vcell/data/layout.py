"""Structural checks of the matrices an ``.h5ad`` stores, made before anything reads them.

A CSR/CSC matrix whose ``indptr`` runs backwards, ends past its data or whose ``indices`` name a
gene (cell) the file does not have is read by scipy, anndata and vcell's kernels without a word:
rows come out scrambled, entries vanish, or a kernel writes outside its buffer and the process
dies. A stored ``shape`` that disagrees with ``obs``/``var`` does the same, and ``bool`` values
reach kernels that cannot take them. Each of these is one error line naming
the file and the part at fault. Repeated (cell, gene) entries are refused too: readers that sum
them (scipy's arithmetic) and readers that take each stored value (a per-gene variance, a count
of stored entries) would disagree about the same file.

The check reads ``indptr`` whole and ``indices`` in chunks (never more than one chunk held), once
per file and process.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from vcell.errors import VcellError, lock_hint

#: Stored entries checked at a time (64 MB of int32 indices).
_CHUNK = 1 << 24
#: (path, inode, size, mtime, ctime) of the files checked in this process.
_CHECKED: set[tuple] = set()


def check_stored_matrices(path: str | os.PathLike, f: h5py.File | None = None) -> None:
    """Raise a one-line :class:`VcellError` naming ``path`` when ``X``, a layer or ``raw.X`` is malformed.

    Parameters
    ----------
    path
        The ``.h5ad`` file (its error lines name it).
    f
        The file, already open for reading (opened here when ``None``).
    """
    path = Path(path)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: no utime sets it
    if key in _CHECKED:
        return
    try:
        if f is None:
            with h5py.File(path, "r") as opened:
                _check_file(path, opened)
        else:
            _check_file(path, f)
    except (OSError, TypeError, ValueError, KeyError, IndexError) as exc:  # e.g. a scalar where an array belongs
        raise VcellError(f"{path}: unreadable .h5ad file ({type(exc).__name__}: {exc}){lock_hint(exc)}") from exc
    _CHECKED.add(key)


def _axis_length(f: h5py.Group, name: str) -> int | None:
    """Rows of ``obs`` or ``var`` (``None`` when the layout is not one this check knows)."""
    node = f.get(name)
    if isinstance(node, h5py.Dataset):  # anndata's oldest layout: a compound dataset
        return len(node)
    if not isinstance(node, h5py.Group):
        return None
    index = node.attrs.get("_index", "_index")
    index = index.decode() if isinstance(index, bytes) else str(index)
    return len(node[index]) if isinstance(node.get(index), h5py.Dataset) else None


def _check_file(path: Path, f: h5py.File) -> None:
    shape = (_axis_length(f, "obs"), _axis_length(f, "var"))
    if "X" not in f:
        raise VcellError(f"{path}: the file has no expression matrix X")
    matrices = [("X", shape)]
    if isinstance(f.get("layers"), h5py.Group):
        matrices += [(f"layers/{k}", shape) for k in f["layers"]]
    if isinstance(f.get("raw"), h5py.Group) and "X" in f["raw"]:  # Seurat's and scanpy's counts beside a normalised X
        matrices.append(("raw/X", (shape[0], _axis_length(f["raw"], "var"))))
    for name, expected in matrices:
        _check_matrix(path, name, f[name], expected)


def _encoding(node) -> str:
    enc = node.attrs.get("encoding-type", "")
    return enc.decode() if isinstance(enc, bytes) else str(enc)


def _check_dtype(path: Path, name: str, dtype: np.dtype, sparse: bool) -> None:
    """X's values: numbers (dense float16 is read as float32 where a kernel needs it; scipy has no sparse float16)."""
    if name != "X":
        return  # a layer is checked by the command that reads it (a boolean mask layer is no expression)
    if dtype.kind not in "fiu" or (sparse and dtype == np.float16):
        raise VcellError(f"{path}: X stores {'sparse ' if sparse else ''}{dtype} values; expression must be stored as float32/"
                         "float64 or integers (in Python: adata.X = adata.X.astype('float32'), then save it again)")


def _python(name: str) -> str:
    """How Python names a stored matrix: ``adata.X``, ``adata.raw.X``, ``adata.layers['counts']``."""
    return {"X": "adata.X", "raw/X": "adata.raw.X"}.get(name) or f"adata.layers[{name.split('/', 1)[1]!r}]"


def _check_shape(path: Path, name: str, got: tuple[int, int], shape: tuple[int | None, int | None]) -> None:
    n_obs, n_vars = shape
    if (n_obs is not None and got[0] != n_obs) or (n_vars is not None and got[1] != n_vars):
        count = lambda n: "?" if n is None else f"{n:,}"  # noqa: E731
        raise VcellError(f"{path}: {name} is {got[0]:,} x {got[1]:,} but the file has {count(n_obs)} cells (obs) x "
                         f"{count(n_vars)} genes (var): the file is corrupt")


def _check_matrix(path: Path, name: str, node, shape: tuple[int | None, int | None]) -> None:
    if isinstance(node, h5py.Dataset):
        if node.ndim != 2:
            raise VcellError(f"{path}: {name} is a {node.ndim}-dimensional array, not a cells x genes matrix")
        _check_dtype(path, name, node.dtype, sparse=False)
        _check_shape(path, name, tuple(node.shape), shape)
        return
    enc = _encoding(node)
    if enc not in ("csr_matrix", "csc_matrix"):
        return  # another encoding: anndata's reader says what it makes of it
    parts = {k: node.get(k) for k in ("data", "indices", "indptr")}
    missing = [k for k, v in parts.items() if not isinstance(v, h5py.Dataset)]
    if missing or "shape" not in node.attrs:
        what = ", ".join(f"{name}/{k}" for k in missing) or f"{name}'s shape"
        raise VcellError(f"{path}: {name} is a sparse matrix without {what}: the file is incomplete or corrupt")
    got = tuple(int(v) for v in node.attrs["shape"])
    _check_dtype(path, name, parts["data"].dtype, sparse=True)
    _check_shape(path, name, got, shape)
    rows = enc == "csr_matrix"
    major, minor = (got[0], got[1]) if rows else (got[1], got[0])
    major_name, minor_name = ("cell", "gene") if rows else ("gene", "cell")
    indptr = parts["indptr"][()]
    n_data, n_indices = len(parts["data"]), len(parts["indices"])
    bad = f"{path}: {name}/indptr"
    if indptr.ndim != 1 or len(indptr) != major + 1:
        raise VcellError(f"{bad} has {len(indptr):,} entries; a {enc.split('_')[0].upper()} matrix of {major:,} "
                         f"{major_name}s needs {major + 1:,}: the file is corrupt")
    if n_data != n_indices:
        raise VcellError(f"{path}: {name} has {n_data:,} values (data) but {n_indices:,} indices: the file is corrupt")
    steps = np.diff(indptr.astype(np.int64))
    # entries past indptr[-1] are spare capacity (scipy can keep some, and anndata writes them): unused, allowed
    if major and (indptr[0] != 0 or (steps < 0).any() or indptr[-1] > n_indices):
        where = ("starts at " + str(int(indptr[0]))) if indptr[0] != 0 else (
            f"decreases at {major_name} {int(np.flatnonzero(steps < 0)[0]):,}" if (steps < 0).any()
            else f"ends at {int(indptr[-1]):,} but there are {n_indices:,} stored entries")
        raise VcellError(f"{bad} {where}: the file is corrupt")
    _check_indices(path, name, parts["indices"], indptr, minor, major_name, minor_name)


def _check_indices(path: Path, name: str, dset: h5py.Dataset, indptr: np.ndarray, minor: int, major_name: str,
                   minor_name: str) -> None:
    """Every stored index in ``[0, minor)`` and none repeated within its row (column), a chunk of rows at a time."""
    start_row, n_major = 0, len(indptr) - 1
    while start_row < n_major:
        # the rows whose entries fit in one chunk (at least one row)
        stop_row = min(n_major, max(start_row + 1, int(np.searchsorted(indptr, indptr[start_row] + _CHUNK, side="right")) - 1))
        lo, hi = int(indptr[start_row]), int(indptr[stop_row])
        if hi > lo:
            idx = dset[lo:hi]
            if idx.min() < 0 or idx.max() >= minor:
                pos = lo + int(np.flatnonzero((idx < 0) | (idx >= minor))[0])
                row = int(np.searchsorted(indptr, pos, side="right")) - 1
                raise VcellError(f"{path}: {name}/indices names {minor_name} {int(dset[pos])} in {major_name} {row:,}, but "
                                 f"the matrix has {minor:,} {minor_name}s: the file is corrupt")
            _check_repeats(path, name, idx, indptr[start_row:stop_row + 1] - lo, start_row, major_name, minor_name)
        start_row = stop_row


def _check_repeats(path: Path, name: str, idx: np.ndarray, ptr: np.ndarray, first_row: int, major_name: str,
                   minor_name: str) -> None:
    """Refuse a (row, column) stored twice. Rows with increasing indices (how writers store them) pass
    in one vectorised comparison; only when some row is unsorted does a numba pass look for repeats."""
    if len(idx) < 2:
        return
    falls = idx[1:] <= idx[:-1]
    starts = ptr[1:-1]
    falls[starts[(starts > 0) & (starts < len(idx))] - 1] = False  # a new row may start lower
    if not falls.any():
        return
    from vcell.data.h5direct import first_repeat  # numba: compiled when a file first needs it

    found = first_repeat(idx, ptr.astype(np.int64), int(idx.max()) + 1)
    if found >= 0:
        row = int(np.searchsorted(ptr, found, side="right")) - 1
        raise VcellError(f"{path}: {name} stores {minor_name} {int(idx[found])} of {major_name} {first_row + row:,} "
                         f"more than once (repeated sparse entries: in Python, .sum_duplicates() on {_python(name)}, then save it "
                         "again)")
