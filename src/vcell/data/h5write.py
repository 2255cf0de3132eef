"""Writing an ``.h5ad`` file chunk by chunk, so a matrix larger than memory never exists in it.

:class:`H5adWriter` appends row blocks of one or more CSR matrices (``X``, ``layers/counts``, ...)
to resizable HDF5 datasets, then writes ``obs``, ``var`` and ``uns`` with anndata's own element
writer, so the file is an ordinary ``.h5ad`` that :func:`anndata.read_h5ad` and cell-load read.
Write into a temporary path (:func:`vcell.data.io.atomic_path`) and the file appears only when
complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.io import check_space
from vcell.errors import VcellError

_CHUNK = 1 << 18  # HDF5 chunk length of data/indices: large enough for fast sequential reads


class H5adWriter:
    """Append CSR row blocks to a new ``.h5ad`` file.

    Parameters
    ----------
    path
        The file to create (replaced if it exists; pass a temporary path).
    n_vars
        Number of columns (genes) of every matrix.
    matrices
        HDF5 paths of the matrices written, e.g. ``("X", "layers/counts")``; every
        :meth:`append` gives a block for each.
    dtype
        Value dtype stored: one for every matrix, or a mapping from matrix path to dtype.

    Examples
    --------
    >>> with H5adWriter(tmp, n_vars=3) as w:  # doctest: +SKIP
    ...     w.append(X=block)
    ...     w.finish(obs, var)
    """

    def __init__(self, path: str | os.PathLike, n_vars: int, matrices: tuple[str, ...] = ("X",), dtype=np.float32):
        self.path, self.n_vars = path, int(n_vars)
        dtypes = dtype if isinstance(dtype, Mapping) else {key: dtype for key in matrices}
        self.n_rows = 0
        self._finished = False
        check_space(path, 0)  # HDF5 meeting a full disk in its first writes can crash the interpreter
        self._f = h5py.File(path, "w")
        self._f.attrs["encoding-type"] = "anndata"
        self._f.attrs["encoding-version"] = "0.1.0"
        self._mats: dict[str, dict] = {}
        index_dtype = np.int32 if self.n_vars < np.iinfo(np.int32).max else np.int64
        opts = dict(maxshape=(None,), chunks=(_CHUNK,))
        for key in matrices:
            g = self._f.require_group(key)
            g.attrs["encoding-type"] = "csr_matrix"
            g.attrs["encoding-version"] = "0.1.0"
            g.attrs["shape"] = (0, self.n_vars)
            indptr = g.create_dataset("indptr", shape=(1,), dtype=np.int64, maxshape=(None,), chunks=(1 << 16,))
            indptr[0] = 0
            self._mats[key.replace("/", "_")] = {
                "group": g,
                # float16 stored as float32: anndata cannot read a float16 sparse matrix (scipy has no float16)
                "data": g.create_dataset("data", shape=(0,), dtype=_storable(dtypes[key]), **opts),
                "indices": g.create_dataset("indices", shape=(0,), dtype=index_dtype, **opts),
                "indptr": indptr,
                "nnz": 0,
            }

    def __enter__(self) -> H5adWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, **blocks) -> None:
        """Append the same rows of every matrix: ``append(X=csr, layers_counts=csr)``.

        Keys are the matrix paths with ``/`` replaced by ``_``. Dense blocks are converted.
        """
        if set(blocks) != set(self._mats):
            raise VcellError(f"append needs a block for each of {sorted(self._mats)}, got {sorted(blocks)}")
        rows = {b.shape[0] for b in blocks.values()}
        if len(rows) != 1:
            raise VcellError(f"append: blocks have different row counts {sorted(rows)}")
        m = rows.pop()
        for key, block in blocks.items():
            if block.dtype == np.float16:  # scipy.sparse has no float16; the values fit float32 exactly
                block = block.astype(np.float32)
            block = sp.csr_matrix(block)
            if block.shape[1] != self.n_vars:
                raise VcellError(f"append: block {key} has {block.shape[1]} columns, expected {self.n_vars}")
            if not block.has_sorted_indices:
                block.sort_indices()
            mat, k = self._mats[key], block.nnz
            lo = mat["nnz"]
            check_space(self.path, k * (mat["data"].dtype.itemsize + mat["indices"].dtype.itemsize) + 8 * (m + 1))
            if k:
                mat["data"].resize((lo + k,))
                mat["indices"].resize((lo + k,))
                mat["data"][lo:] = block.data.astype(mat["data"].dtype, copy=False)
                mat["indices"][lo:] = block.indices
            mat["indptr"].resize((self.n_rows + m + 1,))
            mat["indptr"][self.n_rows + 1 :] = block.indptr[1:].astype(np.int64) + lo
            mat["nnz"] = lo + k
        self.n_rows += m

    def finish(self, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping | None = None, obsm: Mapping | None = None) -> None:
        """Write the annotations and close the file; ``obs`` must have one row per appended row."""
        from anndata.io import write_elem

        if len(obs) != self.n_rows or len(var) != self.n_vars:
            raise VcellError(f"finish: obs/var have {len(obs)} x {len(var)} rows, the matrix is {self.n_rows} x {self.n_vars}")
        for mat in self._mats.values():
            mat["group"].attrs["shape"] = (self.n_rows, self.n_vars)
        write_elem(self._f, "obs", obs)
        write_elem(self._f, "var", var)
        write_elem(self._f, "uns", dict(uns or {}))
        write_elem(self._f, "obsm", dict(obsm or {}))
        for key in ("varm", "obsp", "varp"):
            write_elem(self._f, key, {})
        if "layers" not in self._f:
            write_elem(self._f, "layers", {})
        else:
            self._f["layers"].attrs["encoding-type"] = "dict"
            self._f["layers"].attrs["encoding-version"] = "0.1.0"
        self._finished = True
        self.close()

    def close(self) -> None:
        """Close the file (an unfinished file is not a valid ``.h5ad``: write it to a temporary path)."""
        if self._f.id.valid:
            self._f.close()


def _storable(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype
