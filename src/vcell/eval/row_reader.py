"""A matrix of an ``.h5ad`` read by chunks of rows as canonical CSR arrays: what the evaluator
cuts into gene tiles (:mod:`vcell.eval.tiles`). The row blocks are those of the streaming
preprocess (:class:`vcell.data.preprocess_stream.H5Source`)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from vcell.data.layout import check_stored_matrices
from vcell.data.preprocess_stream import H5Source, encoding_type
from vcell.errors import VcellError, lock_hint
from vcell.eval._band_kernels import dense_fill, dense_row_counts, is_canonical, remap_columns

_SAMPLE_WINDOWS = 32
_SAMPLE_VALUES = 1 << 22

Parts = tuple[np.ndarray, np.ndarray, np.ndarray]  # data, indices (global columns), indptr (int64)


def dense_to_csr(block: np.ndarray) -> Parts:
    """Dense rows as canonical CSR arrays (entries ``!= 0``, as scipy converts them; int32 columns;
    float16 values as float32)."""
    if block.dtype == np.float16:  # neither numba nor scipy.sparse takes it: exact in float32
        block = block.astype(np.float32)
    indptr = np.empty(block.shape[0] + 1, np.int64)
    dense_row_counts(block, indptr)
    data, indices = np.empty(int(indptr[-1]), block.dtype), np.empty(int(indptr[-1]), np.int32)
    dense_fill(block, indptr, data, indices)
    return data, indices, indptr


class MatrixReader:
    """``X`` of an ``.h5ad``, read by chunks of rows with h5py: a CSR group or a dense dataset.

    ``kind`` is ``"csr"``, ``"dense"`` or ``None`` (another layout, e.g. CSC: read it with
    anndata instead). Chunks are canonical CSR (sorted columns, duplicates summed as scipy does).
    """

    def __init__(self, path: str | os.PathLike, where: str | None = None):
        self.path, self.where = Path(path), where or str(path)
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise VcellError(f"{self.where}: not a readable .h5ad file ({exc}){lock_hint(exc)}") from None
        try:
            check_stored_matrices(self.path, self.file)
        except BaseException:
            self.file.close()
            raise
        self.kind = self.source = self.indptr = None
        x = self.file.get("X")
        if isinstance(x, h5py.Group) and encoding_type(x) == "csr_matrix":
            self.kind = "csr"
        elif isinstance(x, h5py.Dataset) and x.ndim == 2:
            self.kind = "dense"
        if self.kind is not None:
            self.source = H5Source(x, self.where)
            self.shape, self.data, self.dtype = self.source.shape, self.source.data, self.source.dtype
            self.indices, self.indptr = getattr(self.source, "indices", None), getattr(self.source, "indptr", None)

    @property
    def n_rows(self) -> int:
        """Rows (cells)."""
        return self.shape[0]

    @property
    def n_genes(self) -> int:
        """Columns (genes)."""
        return self.shape[1]

    @property
    def nnz(self) -> int | None:
        """Stored values (``None`` for a dense matrix: every entry, zeros included, until read)."""
        return int(self.indptr[-1]) if self.kind == "csr" else None

    def gene_weights(self) -> np.ndarray:
        """Expected non-zeros per gene, from rows sampled evenly over the file (float64)."""
        n, m = self.shape
        counts = np.zeros(m, np.float64)
        if self.kind == "csr":
            nnz = self.nnz
            if nnz <= _SAMPLE_VALUES:
                counts += np.bincount(self.indices[()], minlength=m)
            else:
                per = _SAMPLE_VALUES // _SAMPLE_WINDOWS
                for r in np.linspace(0, n - 1, _SAMPLE_WINDOWS).astype(np.int64):
                    a = int(self.indptr[r])
                    counts += np.bincount(self.indices[a : min(nnz, a + per)], minlength=m)
        elif self.kind == "dense":
            rows = max(1, _SAMPLE_VALUES // _SAMPLE_WINDOWS // max(m, 1))
            starts = np.unique(np.linspace(0, max(0, n - rows), _SAMPLE_WINDOWS).astype(np.int64))
            seen = 0
            for r in starts:
                block = self.data[r : r + rows]
                counts += np.count_nonzero(block, axis=0)
                seen += block.shape[0]
            self._density = float(counts.sum()) / max(1, seen * m)
        return counts + 1e-3

    def values(self) -> int:
        """Stored values: a CSR's non-zeros; for a dense matrix the non-zeros expected from a sample."""
        if self.kind == "csr":
            return self.nnz
        if getattr(self, "_density", None) is None:
            self.gene_weights()
        return int(math.ceil(self._density * self.n_rows * self.n_genes))

    def chunks(self, values: int | None = None, col_map: np.ndarray | None = None,
               into: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[tuple[int, int, Parts]]:
        """``(r0, r1, (data, indices, indptr))`` for consecutive row ranges of at most ``values``
        stored values, canonical CSR with local row pointers (arrays valid until the next chunk).

        ``col_map[j]`` renumbers column ``j`` (a file with the genes in another order). ``into``
        (arrays of the file's ``nnz`` values and ``int32`` indices; a CSR file, no ``col_map``):
        each chunk is read straight into its place there and handed out as views of it (unless
        the file's chunk was not canonical: then new arrays).
        """
        if self.kind is None:
            raise VcellError(f"{self.where}: X is neither a CSR matrix nor a dense array; cannot read it by rows")
        direct = into is not None and self.kind == "csr" and col_map is None and self.indices.dtype == np.int32
        for r0, r1 in self.source.bounds(values, max_rows=self.n_rows):
            if self.kind == "csr":
                a, b = int(self.indptr[r0]), int(self.indptr[r1])
                if direct and a < b:
                    self.data.read_direct(into[0], np.s_[a:b], np.s_[a:b])
                    self.indices.read_direct(into[1], np.s_[a:b], np.s_[a:b])
                    data, indices = into[0][a:b], into[1][a:b]
                else:
                    data, indices = self.data[a:b], self.indices[a:b]
                indptr = self.indptr[r0 : r1 + 1] - a
                if indices.dtype != np.int32 and indices.size and int(indices.max(initial=0)) < 2**31 - 1:
                    indices = indices.astype(np.int32)
                if not is_canonical(indices, indptr):
                    m = sp.csr_matrix((data, indices, indptr), shape=(r1 - r0, self.n_genes))
                    m.sum_duplicates()  # sorts each row and sums its duplicates, as on the whole matrix
                    data, indices, indptr = m.data, m.indices, m.indptr.astype(np.int64)
            else:
                data, indices, indptr = dense_to_csr(np.ascontiguousarray(self.source.read(r0, r1)))
            if col_map is not None:
                out_d, out_i = np.empty_like(data), np.empty(indices.size, np.int32)
                remap_columns(data, indices, indptr, col_map, self.n_genes, out_d, out_i)
                data, indices = out_d, out_i
            yield r0, r1, (data, indices, indptr)

    def close(self) -> None:
        """Close the file."""
        self.file.close()

    def __enter__(self) -> MatrixReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
