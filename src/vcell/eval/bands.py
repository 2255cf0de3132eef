"""Gene bands: how the evaluator reads a matrix larger than its memory budget.

A matrix is first read once, by rows, into gene tiles (:mod:`vcell.eval.tiles`). A **band** is
a run of consecutive tiles read back together (:func:`sweep`); its gene blocks are tested in
memory, then it is dropped and the next band is read (in the background, while the current one
is processed). The file is thus read once, written once as tiles and read back once, whatever
its size: the work stays linear in the data, and memory bounded by the band.

A band holds at most half the **memory budget** (``--memory-budget``, default
:data:`DEFAULT_BUDGET` = 2 GB; the other half is the band being read meanwhile). A matrix in
memory is the band that covers every gene, and the same code scores it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError
from vcell.eval.row_reader import Parts
from vcell.eval.tiles import PartBuffers, TileStore

#: Default memory budget of the matrix bands, in bytes (``--memory-budget 2``).
DEFAULT_BUDGET = 2e9


def budget_bytes(gigabytes: float | None) -> float:
    """The memory budget in bytes from ``--memory-budget`` (GB; ``None`` or ``inf``: no limit)."""
    if gigabytes is None or math.isinf(gigabytes):
        return math.inf
    if not gigabytes > 0:
        raise VcellError(f"--memory-budget must be a positive number of GB, got {gigabytes}")
    return float(gigabytes) * 1e9


def band_plan(stores: list[TileStore], budget: float) -> list[list[int]]:
    """Consecutive tiles read together: their bytes in the on-disk ``stores`` sum to at most
    half of ``budget`` (at least one tile per band); one band when nothing is on disk. The
    first band is one tile: the only one read before any work can start."""
    disk = [s for s in stores if s.on_disk and s.n_tiles > 1]
    if not disk:
        n = max((s.n_tiles for s in stores), default=1)
        return [list(range(n))]
    n = disk[0].n_tiles
    if any(s.n_tiles != n or not np.array_equal(s.bounds, disk[0].bounds) for s in disk):
        raise ValueError("stores of one sweep must share their tiles")
    cap = budget / 2
    bands, cur, size = [[0]], [], 0
    for t in range(1, n):
        b = sum(s.nbytes(t) for s in disk)
        if cur and size + b > cap:
            bands.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += b
    if cur:
        bands.append(cur)
    return bands

class _BandBuffers:
    """Two sets of buffers per store on disk (the band in use, the next one being read)."""

    def __init__(self, stores: list[TileStore], bands: list[list[int]]):
        self.sets = []
        for _ in range(2):
            per_store = {}
            for s in stores:
                if not s.on_disk or s.n_tiles == 1:
                    continue
                data = max(sum(_aligned(int(s.nnz[t]) * s.value_size(t)) for t in band) for band in bands)
                values = max(int(sum(s.nnz[t] for t in band)) for band in bands)
                tiles = max(len(band) for band in bands)
                per_store[id(s)] = (np.empty(data, np.uint8), np.empty(values, np.int32), np.empty((tiles, s.n_rows + 1), np.int64))
            self.sets.append(per_store)
        self.raw = PartBuffers(None, None, None, None)

    def slot(self, i: int, store: TileStore, k: int, offset: int, at: int, n: int, size: int) -> PartBuffers | None:
        """Buffers for the ``k``-th tile of band ``i``: ``n`` values of ``size`` bytes from byte
        ``at`` of the values, from ``offset`` of the column indices."""
        bufs = self.sets[i % 2].get(id(store))
        if bufs is None:
            return None
        data, idx, ptrs = bufs
        return PartBuffers(data[at:at + n * size], idx[offset:offset + n], ptrs[k], self.raw.raw_for(0))


def _aligned(n: int) -> int:
    return -(-n // 8) * 8


def sweep(stores: list[TileStore], budget: float, progress: Progress = no_progress,
          description: str = "testing genes") -> Iterator[tuple[list[tuple[int, int]], list[list[Parts]]]]:
    """Every band in gene order: ``(ranges, parts)``, ``ranges[i]`` the genes ``(j0, j1)`` of the
    band's ``i``-th tile and ``parts[s][i]`` store ``s``'s arrays holding them.

    The next band is read in the background while the caller works on the current one, into the
    other of two sets of buffers: the arrays of a band are valid until the next band is asked for.
    """
    bands = band_plan(stores, budget)
    bounds = next((s.bounds for s in stores if s.n_tiles > 1), np.array([0, stores[0].n_genes]))
    buffers = _BandBuffers(stores, bands)

    def load(i: int):
        out = []
        for s in stores:
            parts, offset, at = [], 0, 0
            for k, t in enumerate(bands[i]):
                tt = t if s.n_tiles > 1 else 0
                n, size = int(s.nnz[tt]), s.value_size(tt)
                slot = buffers.slot(i, s, k, offset, at, n, size)
                if slot is not None:
                    slot.raw = buffers.raw.raw
                parts.append(s.part(t, slot))
                if slot is not None:
                    buffers.raw.raw = slot.raw  # grown, perhaps: keep it for the next tiles
                offset += n
                at += _aligned(n * size)
            out.append(parts)
        return out

    with progress(description, total=int(bounds[-1]), unit="genes") as line, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, 0)
        for i, tiles in enumerate(bands):
            parts = pending.result()
            pending = pool.submit(load, i + 1) if i + 1 < len(bands) else None
            yield [(int(bounds[t]), int(bounds[t + 1])) for t in tiles], parts
            del parts
            line.advance(int(bounds[tiles[-1] + 1] - bounds[tiles[0]]))
