"""Reading rows of uncompressed HDF5 datasets straight from the file, without the HDF5 library.

An uncompressed HDF5 dataset is stored as one contiguous block or as fixed-size chunks, each at a
byte offset of the file that h5py reports (:func:`extents`). Knowing them, a row of a CSR matrix
(a range of its ``data`` and ``indices``) or of a dense matrix is one ``pread`` of the file per
range: no HDF5 selection, no chunk cache, no memory map (whose touched pages would count in the
process's resident memory and grow with the file). The reads and the scatter into dense rows run
in numba kernels that release the GIL.

Layouts this cannot read (compressed or filtered datasets, big-endian or non-numeric values,
external storage, unallocated chunks, 2-D datasets chunked across columns) give ``None`` and a
reason; callers then read through h5py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numba
import numpy as np
from numba import types

#: True where the C library's ``pread`` can be called (POSIX).
AVAILABLE = hasattr(os, "pread")

# pread(2) called by name (resolved by the linker), so the compiled kernels can be cached on disk
_pread = types.ExternalFunction("pread", types.intp(types.intc, types.voidptr, types.uintp, types.int64))


@dataclass(frozen=True)
class Extents:
    """Where the elements of a dataset lie in its file.

    Element ``e`` (in C order) is in chunk ``e // chunk_len`` at byte ``offsets[chunk] +
    (e % chunk_len) * itemsize``; a contiguous dataset is one chunk.
    """

    dtype: np.dtype
    chunk_len: int
    offsets: np.ndarray

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize


def extents(dset: h5py.Dataset) -> tuple[Extents | None, str]:
    """The file extents of ``dset``, or ``None`` and why it cannot be read directly."""
    dtype = dset.dtype
    if dtype.kind not in "fiu" or not dtype.isnative or dtype == np.float16:  # numba has no float16
        return None, f"values are {dtype}"
    if dset.external:
        return None, "stored in external files"
    if dset.id.get_create_plist().get_nfilters():
        return None, f"{dset.compression or 'filtered'}-compressed"
    if dset.size == 0:
        return Extents(dtype, 1, np.zeros(1, np.int64)), ""
    if dset.chunks is None:
        offset = dset.id.get_offset()
        if offset is None:
            return None, "compact or unallocated storage"
        return Extents(dtype, int(dset.size), np.array([offset], np.int64)), ""
    if dset.ndim > 2 or (dset.ndim == 2 and dset.chunks[1] != dset.shape[1]):
        return None, f"chunked across columns {dset.chunks}"
    n_chunks = math.ceil(dset.shape[0] / dset.chunks[0])
    offsets = np.full(n_chunks, -1, np.int64)

    def record(info) -> None:
        offsets[info.chunk_offset[0] // dset.chunks[0]] = info.byte_offset

    if hasattr(dset.id, "chunk_iter"):
        dset.id.chunk_iter(record)
    else:  # HDF5 < 1.14: one query per chunk
        for i in range(dset.id.get_num_chunks()):
            record(dset.id.get_chunk_info(i))
    if (offsets < 0).any():
        return None, "has unallocated chunks"
    return Extents(dtype, int(np.prod(dset.chunks)), offsets), ""


@numba.njit(cache=True, nogil=True)
def _read_ranges(fd, starts, stops, chunk_len, offsets, itemsize, out, dst):
    """Read element ranges ``[starts[i], stops[i])`` of a dataset into ``out`` at byte ``dst[i]``.

    Pieces adjacent both in the file and in ``out`` are merged into one ``pread``. Returns 0, or
    -1 when the file ended early or a read failed.
    """
    base = out.ctypes.data
    pend_off, pend_dst, pend_n = np.int64(0), np.int64(0), np.int64(0)
    for i in range(starts.size):
        e, to = starts[i], dst[i]
        while e < stops[i]:
            c = e // chunk_len
            within = e - c * chunk_len
            m = min(stops[i] - e, chunk_len - within)
            off, nbytes = offsets[c] + within * itemsize, m * itemsize
            if pend_n and off == pend_off + pend_n and to == pend_dst + pend_n:
                pend_n += nbytes
            else:
                while pend_n > 0:
                    got = _pread(fd, base + pend_dst, pend_n, pend_off)
                    if got <= 0:
                        return -1
                    pend_off, pend_dst, pend_n = pend_off + got, pend_dst + got, pend_n - got
                pend_off, pend_dst, pend_n = off, to, nbytes
            e += m
            to += nbytes
    while pend_n > 0:
        got = _pread(fd, base + pend_dst, pend_n, pend_off)
        if got <= 0:
            return -1
        pend_off, pend_dst, pend_n = pend_off + got, pend_dst + got, pend_n - got
    return 0


@numba.njit(cache=True, nogil=True)
def scatter_csr(data, indices, lengths, out_rows, out):
    """Add consecutive CSR rows (``lengths[k]`` entries each) into rows ``out_rows[k]`` of dense ``out`` (zeros).

    Returns 0, or -1 when a column index is out of range (nothing is written past ``out``).
    """
    n_cols = out.shape[1]
    p = 0
    for k in range(lengths.size):
        r = out_rows[k]
        for _ in range(lengths[k]):
            j = indices[p]
            if j < 0 or j >= n_cols:
                return -1
            out[r, j] += data[p]  # duplicate entries add up, as in scipy's toarray
            p += 1
    return 0


@numba.njit(cache=True, nogil=True)
def first_repeat(indices, indptr, width):
    """Position of the first column index stored twice within its CSR row, or -1 (one pass)."""
    seen = np.full(width, -1, np.int64)
    for r in range(indptr.size - 1):
        for p in range(indptr[r], indptr[r + 1]):
            if seen[indices[p]] == r:
                return p
            seen[indices[p]] = r
    return -1


@numba.njit(cache=True, nogil=True)
def gather_csr(indptr, indices, data, rows, out):
    """Dense rows ``rows`` of an in-memory CSR matrix into ``out`` (zeros); -1 on a bad column index."""
    n_cols = out.shape[1]
    for k in range(rows.size):
        r = rows[k]
        for p in range(indptr[r], indptr[r + 1]):
            j = indices[p]
            if j < 0 or j >= n_cols:
                return -1
            out[k, j] += data[p]
    return 0


def read_ranges(fd: int, ext: Extents, starts: np.ndarray, stops: np.ndarray, out: np.ndarray, dst: np.ndarray) -> bool:
    """Read element ranges of the dataset of ``ext`` into the buffer ``out`` at byte offsets ``dst``.

    ``out`` must be C-contiguous and large enough; returns False when the file is shorter than its
    layout says (it changed or is truncated).
    """
    if not out.flags.c_contiguous:
        raise ValueError("read_ranges needs a C-contiguous output buffer")
    if starts.size == 0:
        return True
    return _read_ranges(fd, starts, stops, ext.chunk_len, ext.offsets, ext.itemsize, out.reshape(-1), dst) == 0


def verify(fd: int, dset: h5py.Dataset, ext: Extents) -> bool:
    """Whether direct reads of a few elements of ``dset`` (ends, middle, a chunk boundary) equal h5py's."""
    n = int(dset.size)
    if n == 0:
        return True
    width = dset.shape[1] if dset.ndim == 2 else 1
    probes = sorted({0, n - 1, n // 2, min(ext.chunk_len, n - 1), min(ext.chunk_len - 1, n - 1)})
    starts = np.array(probes, np.int64)
    got = np.zeros(len(probes), ext.dtype)
    if not read_ranges(fd, ext, starts, starts + 1, got, np.arange(len(probes), dtype=np.int64) * ext.itemsize):
        return False
    want = np.array([dset[p // width, p % width] if width > 1 else dset[p] for p in probes], dtype=ext.dtype)
    return got.tobytes() == want.tobytes()
