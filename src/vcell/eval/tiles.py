"""Gene tiles: a matrix's rows cut into ranges of genes, in memory or in a temporary folder.

The tests of the differential expression need, for one gene, the values of every cell, but an
``.h5ad`` stores cells: a CSR matrix is a list of rows. The evaluator therefore reads the file
once, by chunks of rows (:class:`~vcell.eval.row_reader.MatrixReader`), and cuts every chunk
into gene **tiles** (:func:`write_stores`): each tile's part of the chunk is appended to files
of a temporary folder beside the output (:class:`TileStore`, :class:`Scratch`), so that after
the pass every tile is a CSR matrix of all rows restricted to its genes (column indices kept
global), stored on disk. A matrix whose stored values fit in the memory budget is read into
memory as one tile, with no temporary file. :mod:`vcell.eval.bands` reads the tiles back.

Tiles are cut (:func:`plan_tiles`) so that about :data:`TILES_PER_BAND` of them make a band of
half the budget, by the number of stored values each gene is expected to hold. On disk a value
takes 2 bytes when it is a small count (uint16), else its dtype's size, plus a 2-byte column
offset within its tile.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from vcell.data.io import clean_leftovers, free_space, human_size, temp_prefix
from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError
from vcell.eval._band_kernels import tile_counts, tile_fill, tile_fill_compact
from vcell.eval.row_reader import MatrixReader, Parts

#: Tiles that make one band (finer tiles fill the budget more closely; coarser ones mean fewer files).
TILES_PER_BAND = 4


def plan_tiles(weights: np.ndarray, total_bytes: float, budget: float) -> np.ndarray:
    """Gene boundaries of tiles of about ``budget / (2 * TILES_PER_BAND)`` bytes, cut by the
    expected stored values per gene (``weights``); one tile when everything fits in ``budget``."""
    n = len(weights)
    if n == 0 or total_bytes <= budget:
        return np.array([0, n], np.int64)
    k = int(min(n, max(2, math.ceil(total_bytes / (budget / (2 * TILES_PER_BAND))))))
    cum = np.cumsum(np.asarray(weights, np.float64))
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="right")
    return np.unique(np.concatenate([[0], np.clip(cuts, 1, n - 1), [n]])).astype(np.int64)


class TileStore:
    """The rows of a matrix (all, or a selection in row order) cut into gene tiles.

    In memory (``folder`` None: one tile, arrays allocated for ``nnz`` values, grown if more
    come) or as three files
    per tile in ``folder`` (values, column indices, per-row counts), appended chunk by chunk.
    ``part(t)`` gives tile ``t`` of a run's common tiling as CSR arrays (a store of one tile
    serves every ``t`` with its whole matrix: the kernels only read columns of the tile).
    """

    def __init__(self, n_rows: int, n_genes: int, bounds: np.ndarray, dtype, folder: Path | None = None,
                 name: str = "X", nnz: int | None = None, storage: str = "csr"):
        self.n_rows, self.n_genes, self.dtype, self.folder, self.name = int(n_rows), int(n_genes), np.dtype(dtype), folder, name
        self.bounds = np.asarray(bounds, np.int64)
        self.n_tiles = len(self.bounds) - 1
        self.storage = storage  # how the source stored it ("csr" or "dense"): the rounding of the means follows it
        self.nnz = np.zeros(self.n_tiles, np.int64)
        self.n_written = 0
        self._transform = None
        self._files = []
        if folder is None:
            if self.n_tiles != 1 or nnz is None:
                raise ValueError("an in-memory store is one tile of known size")
            self._data, self._idx = np.empty(int(nnz), self.dtype), np.empty(int(nnz), np.int32)
            self._indptr = np.zeros(self.n_rows + 1, np.int64)
        else:
            self._open_files()
        self._buf = (np.empty(0, self.dtype), np.empty(0, np.uint16))
        # on disk, a tile's values are pieces (one per chunk) of uint16 (counts) or of the store's dtype
        self._pieces: list[list[tuple[int, bool]]] = [[] for _ in range(self.n_tiles)]
        self._small = self.dtype.kind in "fiu"  # uint16 values worth trying until a value does not fit
        self.keep_small = False  # True: a tile of small counts is handed out as uint16 (its readers take them)

    def _open_files(self) -> None:
        """The three files of each tile, open for appending while the store is written."""
        need = 3 * self.n_tiles
        limit = allow_open_files(need)
        try:
            for t in range(self.n_tiles):
                self._files.append(tuple(open(self._path(t, ext), "wb") for ext in ("data", "idx", "cnt")))
        except OSError as exc:
            self._close_files()
            self._remove_files()
            if exc.errno != errno.EMFILE:
                raise
            raise VcellError(f"{self.folder}: {self.n_tiles} gene tiles keep {need} files open while they are written, more than "
                             f"this process may open{f' (ulimit -n {limit})' if limit else ''}: raise that limit, or --memory-budget (fewer, larger "
                             "tiles)") from None

    @classmethod
    def from_csr(cls, X: sp.csr_matrix, name: str = "X") -> TileStore:
        """A canonical CSR matrix in memory as a one-tile store (no copy)."""
        store = cls(X.shape[0], X.shape[1], np.array([0, X.shape[1]]), X.dtype, None, name, 0)
        store._data, store._idx, store._indptr = X.data, X.indices, X.indptr
        store.nnz[0], store.n_written = X.nnz, X.shape[0]
        return store

    def _path(self, t: int, ext: str) -> Path:
        return self.folder / f"{self.name}.{t}.{ext}"

    @property
    def on_disk(self) -> bool:
        """Whether the tiles are files (else one tile in memory)."""
        return self.folder is not None

    def append(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, sel: np.ndarray | None = None,
               threads: int = 2) -> None:
        """Add rows ``sel`` (local, increasing; default all) of a canonical CSR chunk."""
        n_chunk = indptr.shape[0] - 1
        if not self.on_disk and sel is None and self._read_in_place(data, indices, int(self._indptr[self.n_written])):
            start = int(self._indptr[self.n_written])
            self._indptr[self.n_written + 1 : self.n_written + 1 + n_chunk] = start + indptr[1:] - indptr[0]
            self.nnz[0] += int(indptr[-1] - indptr[0])
            self.n_written += n_chunk
            return
        sel = np.arange(n_chunk, dtype=np.int64) if sel is None else np.asarray(sel, np.int64)
        counts = np.empty((self.n_tiles, sel.size), np.int64)
        pos = np.empty((sel.size, self.n_tiles), np.int64)
        tile_counts(indices, indptr, sel, self.bounds, counts, pos)
        per_tile = counts.sum(axis=1)
        if not self.on_disk:
            start = int(self._indptr[self.n_written])
            stop = start + int(per_tile[0])
            if stop > self._data.size:  # more values than expected (a dense matrix's estimate): grow
                size = max(stop, int(self._data.size * 1.5))
                self._data = np.concatenate([self._data[:start], np.empty(size - start, self.dtype)])
                self._idx = np.concatenate([self._idx[:start], np.empty(size - start, np.int32)])
            ends = start + np.cumsum(counts[0])
            if np.shares_memory(data, self._data):  # read in place after a chunk that was not: moved down, in order
                threads = 1
            half = sel.size // 2 if threads > 1 else sel.size  # two halves of the rows, filled at once
            jobs = [(0, half, start), (half, sel.size, int(ends[half - 1]) if half else start)]
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda j: tile_fill(data, indices, sel[j[0]:j[1]], counts[:, j[0]:j[1]], pos[j[0]:j[1]],
                                                  np.array([j[2]], np.int64), 0, 1, self._data, self._idx), jobs))
            self._indptr[self.n_written + 1 : self.n_written + 1 + sel.size] = ends
        else:
            self._write(data, indices, sel, counts, pos, per_tile, threads)
        self.nnz += per_tile
        self.n_written += sel.size

    def direct_buffers(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The arrays a reader may read the rows straight into (:meth:`MatrixReader.chunks`'s
        ``into``): those of an in-memory store of the file's rows, all of them, in its dtype."""
        if self.on_disk or self.n_written:
            return None
        return self._data, self._idx

    def _read_in_place(self, data: np.ndarray, indices: np.ndarray, start: int) -> bool:
        """Whether a chunk's arrays already are this store's, at ``start`` (nothing to copy)."""
        def at(a: np.ndarray) -> int:
            return a.__array_interface__["data"][0]

        return (data.size > 0 and data.dtype == self._data.dtype and indices.dtype == self._idx.dtype
                and at(data) == at(self._data) + start * self._data.itemsize and at(indices) == at(self._idx) + start * 4)

    def _write(self, data, indices, sel, counts, pos, per_tile, threads: int) -> None:
        """Append a chunk's tiles to the files, in their compact form (uint16 column offsets,
        uint16 counts when every value of the chunk is one)."""
        total = int(per_tile.sum())
        starts = np.concatenate([[0], np.cumsum(per_tile)]).astype(np.int64)
        cut = int(np.searchsorted(starts, total / 2)) if threads > 1 else self.n_tiles  # two halves of the values
        halves = [(0, cut), (cut, self.n_tiles)] if 0 < cut < self.n_tiles else [(0, self.n_tiles)]
        small = self._small
        for attempt in (True, False):
            if attempt and not small:
                continue
            dtype = np.uint16 if attempt else self.dtype
            if self._buf[0].size < total or self._buf[0].dtype != dtype:
                self._buf = (np.empty(max(total, self._buf[0].size), dtype), np.empty(max(total, self._buf[1].size), np.uint16))
            with ThreadPoolExecutor(len(halves)) as pool:
                done = list(pool.map(lambda h: tile_fill_compact(data, indices, sel, counts, pos, starts, h[0], h[1], self.bounds, attempt,
                                                                    *self._buf),
                                     halves))
            if all(done):
                break
            self._small = small = False  # a value that is not a small count: plain values from now on
        for t, (fd, fi, fc) in enumerate(self._files):
            a, b = starts[t], starts[t + 1]
            self._buf[0][a:b].tofile(fd)
            self._buf[1][a:b].tofile(fi)
            counts[t].astype(np.int32).tofile(fc)
            self._pieces[t].append((int(b - a), small))

    def finish(self) -> None:
        """Close the files (the store is then read-only)."""
        self._close_files()
        if self.n_written != self.n_rows:
            raise ValueError(f"{self.n_written} rows written, {self.n_rows} announced")

    def _close_files(self) -> None:
        for handles in self._files:
            for h in handles:
                h.close()
        self._files = []
        self._buf = (np.empty(0, self.dtype), np.empty(0, np.uint16))

    def _remove_files(self) -> None:
        for t in range(self.n_tiles):
            for ext in ("data", "idx", "cnt"):
                self._path(t, ext).unlink(missing_ok=True)

    def transform(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Apply ``fn(data, indptr) -> data`` to the values: now in memory, at each read on disk."""
        if self.on_disk:
            self._transform = fn
        else:
            self._data = fn(self._data[: int(self.nnz[0])], self._indptr)
            self.dtype = self._data.dtype

    def to_csr(self) -> sp.csr_matrix:
        """The matrix of an in-memory store as a CSR matrix sharing its arrays."""
        if self.on_disk:
            raise ValueError("a store on disk is read tile by tile")
        return sp.csr_matrix(self.part(0), shape=(self.n_rows, self.n_genes))

    def _kept_small(self, t: int) -> bool:
        """Whether tile ``t`` is handed out as uint16 counts (every piece of it small)."""
        return self.keep_small and self.on_disk and all(small for _, small in self._pieces[t])

    def value_size(self, t: int) -> int:
        """Bytes of one of tile ``t``'s values once read."""
        return 2 if self._kept_small(t) else self.dtype.itemsize

    def nbytes(self, t: int) -> int:
        """Bytes tile ``t`` takes once read."""
        return int(self.nnz[t]) * (self.value_size(t) + 4) + (self.n_rows + 1) * 8

    @property
    def total_bytes(self) -> int:
        """Bytes of all tiles."""
        return sum(self.nbytes(t) for t in range(self.n_tiles))

    def part(self, t: int, into: PartBuffers | None = None) -> Parts:
        """Tile ``t`` of the common tiling (the whole matrix for a one-tile store) as CSR arrays,
        decoded into ``into``'s buffers when given (no fresh memory to fault in), else new arrays."""
        if not self.on_disk:
            n = int(self.nnz[0])
            return self._data[:n], self._idx[:n], self._indptr
        if self.n_tiles == 1:
            t = 0
        n = int(self.nnz[t])
        small = self._kept_small(t)
        slot = into or PartBuffers(np.empty(n * self.value_size(t), np.uint8), np.empty(n, np.int32), np.empty(self.n_rows + 1, np.int64), None)
        data = slot.data[: n * self.value_size(t)].view(np.uint16 if small else self.dtype)
        idx, indptr = slot.idx[:n], slot.indptr
        raw = slot.raw_for(max(2 * n, 4 * self.n_rows, self._file_bytes(t)))
        if small:  # straight from the file, no conversion
            with open(self._path(t, "data"), "rb") as f:
                f.readinto(memoryview(data))
        else:
            self._read_values(t, data, raw)
        np.add(self._read(t, "idx", raw, np.uint16), self.bounds[t], out=idx, dtype=np.int32)
        indptr[0] = 0
        np.cumsum(self._read(t, "cnt", raw, np.int32), out=indptr[1:])
        if self._transform is not None:
            data = self._transform(data, indptr)
        return data, idx, indptr

    def _file_bytes(self, t: int) -> int:
        return max(os.path.getsize(self._path(t, ext)) for ext in ("data", "idx", "cnt"))

    def _read(self, t: int, ext: str, raw: np.ndarray, dtype) -> np.ndarray:
        """File ``ext`` of tile ``t`` read into ``raw`` (bytes), viewed as ``dtype``."""
        with open(self._path(t, ext), "rb") as f:
            n = f.readinto(memoryview(raw))
        return raw[:n].view(dtype)

    def _read_values(self, t: int, out: np.ndarray, raw: np.ndarray) -> None:
        """Tile ``t``'s values into ``out``, from their pieces (uint16 counts or the store's dtype)."""
        src = self._read(t, "data", raw, np.uint8)
        at = pos = 0
        for n, small in self._pieces[t]:
            kind = np.dtype(np.uint16) if small else self.dtype
            out[at:at + n] = src[pos:pos + n * kind.itemsize].view(kind)
            at, pos = at + n, pos + n * kind.itemsize

    def close(self) -> None:
        """Release the memory, delete the files (also after a failed or interrupted write: no row count checked)."""
        self._close_files()
        if self.on_disk:
            self._remove_files()
        else:
            self._data = self._idx = np.empty(0)


def allow_open_files(extra: int) -> int | None:
    """Raise this process's soft limit of open files, up to its hard limit, so that ``extra`` more
    fit beside those open now (a common soft limit is 1,024; hard limits are usually far higher);
    returns the soft limit then (``None`` where there is none to read)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 256
    want = open_now + extra + 64
    if soft != resource.RLIM_INFINITY and want > soft:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
    return soft


def write_stores(reader: MatrixReader, targets: list[tuple[TileStore, np.ndarray | None]],
                 on_chunk: Callable[[int, int, Parts], None] | None = None, col_map: np.ndarray | None = None,
                 progress: Progress = no_progress, description: str = "reading", threads: int = 2) -> None:
    """One pass over ``reader``'s rows: ``on_chunk(r0, r1, parts)`` (statistics), then each
    store of ``targets`` gets its rows (``None``: all; else sorted row numbers of the file).
    The next chunk is read from the file while the current one is cut into tiles and written."""
    try:
        _write_stores(reader, targets, on_chunk, col_map, progress, description, threads)
    except OSError as exc:
        # numpy's tofile reports a short write without an errno ("N requested and M written"): a full disk or quota
        short_write = exc.errno is None and "requested and" in str(exc) and "written" in str(exc)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and not short_write:
            raise
        folder = next((s.folder for s, _ in targets if s.folder is not None), None)
        raise VcellError(f"{folder}: the disk filled up while the temporary gene bands were written; free some space, write "
                         "the output elsewhere (--out), or raise --memory-budget to read the matrix into memory") from None


def _write_stores(reader, targets, on_chunk, col_map, progress, description, threads) -> None:
    # a store of all the rows in memory is read into directly (one copy of the values fewer)
    into = next((s.direct_buffers() for s, rows in targets if rows is None and s.direct_buffers() is not None
                 and s.dtype == reader.dtype and s._data.size >= (reader.nnz or 0) > 0), None)
    chunks = reader.chunks(col_map=col_map, into=into)
    with progress(description, total=reader.n_rows, unit="cells") as line, ThreadPoolExecutor(1) as io:
        pending = io.submit(next, chunks, None)
        while (item := pending.result()) is not None:
            pending = io.submit(next, chunks, None)
            r0, r1, parts = item
            if on_chunk is not None:
                on_chunk(r0, r1, parts)
            for store, rows in targets:
                sel = None
                if rows is not None:
                    lo, hi = np.searchsorted(rows, [r0, r1])
                    sel = rows[lo:hi] - r0
                store.append(*parts, sel, threads)
            line.advance(r1 - r0)
    for store, _ in targets:
        store.finish()


# --------------------------------------------------------------------------------------------

class PartBuffers:
    """Buffers one band of one store is decoded into (reused band after band: memory already
    faulted in), and a scratch of raw file bytes."""

    def __init__(self, data: np.ndarray, idx: np.ndarray, indptr: np.ndarray, raw: np.ndarray | None):
        self.data, self.idx, self.indptr, self.raw = data, idx, indptr, raw

    def raw_for(self, n: int) -> np.ndarray:
        """A byte buffer of at least ``n`` bytes."""
        if self.raw is None or self.raw.size < n:
            self.raw = np.empty(n, np.uint8)
        return self.raw

class Scratch:
    """A temporary folder beside ``out`` for the tiles (``.NAME.PID-XXXXXXXX.tmp``), made on first
    use and removed by :meth:`close` (a folder left by a killed run is removed by the next one)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self._path: Path | None = None

    def folder(self, need_bytes: float = 0) -> Path:
        """The folder (created now if needed); refuses when the disk lacks ``need_bytes``."""
        if self._path is None:
            parent = self.out.parent
            parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.out)
            self._path = Path(tempfile.mkdtemp(prefix=temp_prefix(self.out), suffix=".tmp", dir=parent))
        free = free_space(self._path)
        if free is not None and need_bytes > free:
            raise VcellError(
                f"{self._path.parent}: {human_size(free)} free, the temporary gene bands need {human_size(int(need_bytes))}; "
                "free some space, write the output elsewhere (--out), or raise --memory-budget to read the matrix into memory"
            )
        return self._path

    def close(self) -> None:
        """Remove the folder and everything in it."""
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(reader: MatrixReader, bounds: np.ndarray, scratch: Scratch, name: str, rows: np.ndarray | None = None,
               dtype=None, counts: bool = False) -> TileStore:
    """A store for ``reader``'s rows (``rows``: a sorted selection): in memory when ``bounds`` is
    one tile, else in ``scratch`` (its disk space checked against the expected bytes; ``counts``:
    the values are counts, 2 bytes each on disk)."""
    dtype = np.dtype(dtype or reader.dtype)
    n = reader.n_rows if rows is None else int(rows.size)
    if len(bounds) == 2:
        if reader.kind == "csr":
            nnz = reader.nnz if rows is None else int(np.diff(reader.indptr)[rows].sum())
        else:
            nnz = int(reader.values() * 1.05 * n / max(reader.n_rows, 1))
        return TileStore(n, reader.n_genes, bounds, dtype, None, name, nnz, storage=reader.kind)
    small = 2 if counts or dtype.kind in "iu" or reader.dtype.kind in "iu" else dtype.itemsize
    expected = reader.values() * (small + 2)
    if rows is not None:
        expected = expected * n / max(reader.n_rows, 1)
    expected += 4 * n * (len(bounds) - 1)  # each tile's per-row counts (int32)
    folder = scratch.folder(expected * 1.05)
    return TileStore(n, reader.n_genes, bounds, dtype, folder, name, storage=reader.kind)
