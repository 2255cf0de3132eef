"""Reading arbitrary rows (cells) of an expression matrix as dense float32 blocks.

:class:`MemoryRows` serves a matrix already in memory. :class:`H5Rows` streams rows from an
``.h5ad`` file on disk with h5py: it reads only the requested rows (consecutive rows in one
read), never the whole matrix nor the whole CSR ``indptr``, so memory stays flat however large
the file is. It opens the file lazily in each process, so it is safe in DataLoader workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from vcell.errors import VcellError


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique rows into half-open runs of consecutive values."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, ends)]


class MemoryRows:
    """Rows of an in-memory dense or sparse matrix."""

    def __init__(self, X):
        self.X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        if sp.issparse(self.X) and self.X.indices.dtype != self.X.indptr.dtype:
            # mixed 32/64-bit index arrays make scipy copy the whole index array on every row read
            self.X.indices = self.X.indices.astype(self.X.indptr.dtype)
        self.shape = self.X.shape

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 array of ``rows`` (any order, repeats allowed)."""
        block = self.X[np.asarray(rows, dtype=np.int64)]
        if sp.issparse(block):
            block = block.toarray()
        return np.asarray(block, dtype=np.float32)


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
        self._file: h5py.File | None = None
        self._pid: int | None = None
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

    def __getstate__(self):
        # h5py handles cannot cross process boundaries; each worker reopens the file.
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def _node(self):
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.key]

    def close(self) -> None:
        """Close the file handle of this process (it reopens on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 array of ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.zeros((uniq.size, self.shape[1]), dtype=np.float32)
        node = self._node()
        if not self.sparse:
            pos = 0
            for start, stop in _runs(uniq):
                out[pos : pos + stop - start] = node[start:stop]
                pos += stop - start
            return out[inverse]
        indptr, data, indices = node["indptr"], node["data"], node["indices"]
        pos = 0
        for start, stop in _runs(uniq):
            ptr = indptr[start : stop + 1].astype(np.int64)
            lo, hi = int(ptr[0]), int(ptr[-1])
            block = sp.csr_matrix((data[lo:hi], indices[lo:hi], ptr - lo), shape=(stop - start, self.shape[1]))
            out[pos : pos + stop - start] = block.toarray()
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
