"""Reading arbitrary rows (cells) of an expression matrix as dense float32 blocks.

:class:`MemoryRows` serves a matrix already in memory. :class:`H5Rows` streams rows from an
``.h5ad`` file on disk: it reads only the requested rows, never the whole matrix, so memory stays
flat however large the file is (it keeps only the CSR ``indptr``, 8 bytes a cell).

How :class:`H5Rows` reads: when the matrix is stored uncompressed (how vcell and anndata write
it), each row is one ``pread`` of the file at the byte offset of its values
(:mod:`vcell.data.h5direct`), ~100x faster than HDF5 reads of scattered rows. Compressed or
otherwise unusual layouts are read through h5py (consecutive rows in one read), with a warning.
Both open the file lazily in each process and check it is the file the reader was built on, so a
reader is safe in DataLoader workers (fork or spawn).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

import vcell.data.h5direct as h5direct
from vcell.errors import VcellError

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()
#: Below this many bytes of matrix (uncompressed) a file read through HDF5 is not worth a warning.
SLOW_READ_WARN_BYTES = 256 * 2**20


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique rows into half-open runs of consecutive values."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, ends)]


def _check_rows(rows, n_rows: int, where: str) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        bad = rows[(rows < 0) | (rows >= n_rows)][0]
        raise VcellError(f"{where}: row {bad} is out of range (the matrix has {n_rows} rows)")
    return rows


class MemoryRows:
    """Rows of an in-memory dense or sparse matrix."""

    def __init__(self, X):
        self.X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        self.shape = self.X.shape

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 array of ``rows`` (any order, repeats allowed)."""
        rows = _check_rows(rows, self.shape[0], "in-memory matrix")
        if not sp.issparse(self.X):
            return np.asarray(self.X[rows], dtype=np.float32)
        out = np.zeros((rows.size, self.shape[1]), dtype=np.float32)
        if h5direct.gather_csr(self.X.indptr, self.X.indices, self.X.data, rows, out) != 0:
            raise VcellError("in-memory matrix: a CSR column index is out of range")
        return out


class H5Rows:
    """Rows of a matrix stored in an ``.h5ad`` file, read on demand.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    key
        HDF5 path of the matrix: ``"X"`` (default), ``"layers/counts"``, ``"obsm/X_pca"``, ...
    """

    def __init__(self, path: str | os.PathLike, key: str = "X"):
        self.path = Path(path)
        self.key = key.strip("/")
        self._reset()
        with h5py.File(self.path, "r") as f:
            if self.key not in f:
                raise VcellError(f"{self.path}: no matrix at {self.key!r} in the file")
            node = f[self.key]
            if isinstance(node, h5py.Group):
                enc = node.attrs.get("encoding-type", "")
                enc = enc.decode() if isinstance(enc, bytes) else str(enc)
                if enc != "csr_matrix":
                    raise VcellError(f"{self.path}: matrix {self.key!r} is stored as {enc or 'an unknown group'}; "
                                     "streaming needs CSR or dense (convert with AnnData.X = X.tocsr())")
                self.sparse = True
                self.shape = tuple(int(s) for s in node.attrs["shape"])
            else:
                self.sparse = False
                self.shape = tuple(node.shape)
        self._identity = self._stat(os.stat(self.path))

    @staticmethod
    def _stat(st: os.stat_result) -> tuple:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _reset(self) -> None:
        self._pid: int | None = None
        self._fd: int | None = None
        self._file: h5py.File | None = None
        self._ext: dict[str, h5direct.Extents] | None = None
        self._indptr: np.ndarray | None = None
        self.why_not_direct: str | None = None

    def __getstate__(self):
        # file handles and what was read from the file stay in the process that opened them
        state = self.__dict__.copy()
        for key in ("_pid", "_fd", "_file", "_ext", "_indptr", "why_not_direct"):
            state[key] = None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    @property
    def direct(self) -> bool:
        """Whether rows are read straight from the file (opens it in this process if needed)."""
        self._open()
        return self._ext is not None

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        # handles inherited by fork are dropped, not closed: the parent's numbers could have been reused here
        self._reset()
        fd, f = os.open(self.path, os.O_RDONLY), None
        try:
            if self._stat(os.fstat(fd)) != self._identity:
                raise VcellError(f"{self.path}: the file changed after it was opened for reading rows; restart the run")
            f = h5py.File(self.path, "r")
            node = f[self.key]
            parts = {k: node[k] for k in ("data", "indices")} if self.sparse else {"values": node}
            if self.sparse:
                self._indptr = node["indptr"][:].astype(np.int64, copy=False)
            ext, why = self._extents(fd, parts)
        except BaseException:
            os.close(fd)
            if f is not None:
                f.close()
            raise
        if ext is None:
            os.close(fd)
            self._file, self.why_not_direct = f, why
            if (str(self.path), self.key) not in _warned:
                _warned.add((str(self.path), self.key))
                # a small matrix is read in well under a second either way: said only with -v
                big = sum(d.size * d.dtype.itemsize for d in parts.values()) >= SLOW_READ_WARN_BYTES
                (log.warning if big else log.debug)(
                    "%s: %s is %s; its rows are read through HDF5, ~100x slower (write the file "
                    "uncompressed, e.g. with vcell data preprocess, for fast streaming)", self.path, self.key, why)
        else:
            f.close()
            self._fd, self._ext = fd, ext
        self._pid = os.getpid()

    @staticmethod
    def _extents(fd: int, parts: dict) -> tuple[dict | None, str]:
        if not h5direct.AVAILABLE:
            return None, "on a system without pread"
        found = {}
        for name, dset in parts.items():
            ext, why = h5direct.extents(dset)
            if ext is None:
                return None, f"{why} ({name})"
            if not h5direct.verify(fd, dset, ext):
                return None, f"laid out in a way direct reads do not reproduce ({name})"
            found[name] = ext
        return found, ""

    def close(self) -> None:
        """Close the file of this process (it reopens on the next read)."""
        if self._pid == os.getpid():
            if self._fd is not None:
                os.close(self._fd)
            if self._file is not None:
                self._file.close()
        self._reset()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 array of ``rows`` (any order, repeats allowed)."""
        rows = _check_rows(rows, self.shape[0], f"{self.path}:{self.key}")
        self._open()
        if self._ext is None:
            return self._read_hdf5(rows)
        order = np.argsort(rows, kind="stable")  # file order: neighbouring rows merge into one read
        srt = rows[order]
        n_cols = self.shape[1]
        if not self.sparse:
            ext = self._ext["values"]
            starts = srt * n_cols
            if ext.dtype == np.float32:
                out = np.empty((rows.size, n_cols), dtype=np.float32)
                self._pread(ext, starts, starts + n_cols, out, order * (n_cols * 4))
                return out
            buf = np.empty((rows.size, n_cols), dtype=ext.dtype)
            self._pread(ext, starts, starts + n_cols, buf, np.arange(rows.size, dtype=np.int64) * (n_cols * ext.itemsize))
            out = np.empty((rows.size, n_cols), dtype=np.float32)
            out[order] = buf
            return out
        data, indices, at = self._csr_parts(srt)
        out = np.zeros((rows.size, n_cols), dtype=np.float32)
        if h5direct.scatter_csr(data, indices, np.diff(at), order, out) != 0:
            raise VcellError(f"{self.path}:{self.key}: a CSR column index is out of range (corrupt file)")
        return out

    def read_csr(self, rows: np.ndarray) -> sp.csr_matrix:
        """``rows`` (any order, repeats allowed) as a CSR matrix of the stored values: no dense
        block, for wide rows of which few values are stored (e.g. every gene's raw counts)."""
        rows = _check_rows(rows, self.shape[0], f"{self.path}:{self.key}")
        self._open()
        if self._ext is None or not self.sparse:
            return sp.csr_matrix(self.read(rows))
        uniq, inverse = np.unique(rows, return_inverse=True)
        data, indices, at = self._csr_parts(uniq)
        if indices.size and (indices.min() < 0 or indices.max() >= self.shape[1]):
            raise VcellError(f"{self.path}:{self.key}: a CSR column index is out of range (corrupt file)")
        block = sp.csr_matrix((data.astype(np.float32, copy=False), indices, at), shape=(uniq.size, self.shape[1]))
        return block if uniq.size == rows.size and (inverse == np.arange(rows.size)).all() else block[inverse]

    def _csr_parts(self, srt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored values, column indices and row pointers of the sorted rows ``srt``, one pread per run."""
        lo, hi = self._indptr[srt], self._indptr[srt + 1]
        lengths = hi - lo
        if srt.size and (lengths.min() < 0 or lo.min() < 0 or hi.max() > self._indptr[-1]):
            raise VcellError(f"{self.path}:{self.key}: corrupt CSR indptr near row {int(srt[np.argmin(lengths)])}")
        at = np.concatenate([[0], np.cumsum(lengths)])
        ext_d, ext_i = self._ext["data"], self._ext["indices"]
        data, indices = np.empty(int(at[-1]), dtype=ext_d.dtype), np.empty(int(at[-1]), dtype=ext_i.dtype)
        self._pread(ext_d, lo, hi, data, at[:-1] * ext_d.itemsize)
        self._pread(ext_i, lo, hi, indices, at[:-1] * ext_i.itemsize)
        return data, indices, at

    def _pread(self, ext, starts, stops, out, dst) -> None:
        if not h5direct.read_ranges(self._fd, ext, starts, stops, out, dst):
            raise VcellError(f"{self.path}: the file ended before the rows it lists; it changed or is truncated")

    def _read_hdf5(self, rows: np.ndarray) -> np.ndarray:
        """Rows through h5py: each run of consecutive rows in one read (of each CSR array)."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.zeros((uniq.size, self.shape[1]), dtype=np.float32)
        node = self._file[self.key]
        data, indices = (node["data"], node["indices"]) if self.sparse else (None, None)  # h5py lookups cost
        pos = 0
        for start, stop in _runs(uniq):
            if self.sparse:
                ptr = self._indptr[start : stop + 1]
                lo, hi = int(ptr[0]), int(ptr[-1])
                block = sp.csr_matrix((data[lo:hi], indices[lo:hi], ptr - lo), shape=(stop - start, self.shape[1])).toarray()
            else:
                block = node[start:stop]
            out[pos : pos + stop - start] = block
            pos += stop - start
        return out[inverse]


def row_source(adata, path: str | os.PathLike | None = None, key: str = "X"):
    """The right row reader for ``adata``: streamed from ``path`` when backed, else in memory."""
    if adata.isbacked:
        return H5Rows(path or adata.filename, key)
    if key == "X":
        return MemoryRows(adata.X)
    kind, _, name = key.partition("/")
    store = {"layers": adata.layers, "obsm": adata.obsm}.get(kind)
    if store is None or name not in store:
        raise VcellError(f"no matrix at {key!r} in the data")
    return MemoryRows(store[name])
