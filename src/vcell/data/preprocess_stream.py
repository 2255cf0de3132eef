"""Row blocks of an expression matrix, in memory or streamed from an ``.h5ad`` file, and the
chunked writer of ``vcell data preprocess``'s output.

:class:`MemorySource` serves a matrix in memory as one block; :class:`H5Source` reads a CSR group
(or a dense dataset) of an ``.h5ad`` file with h5py, a block of consecutive rows at a time, sized
by stored values (:data:`BLOCK_VALUES`) so memory stays flat whatever the number of cells.
:func:`iter_blocks` reads the next block on a second thread while the current one is worked on.
:func:`open_input` opens a file for streaming (annotations read, matrices left on disk) and
:func:`write_preprocessed` writes the preprocessed matrices block by block with
:class:`~vcell.data.h5write.H5adWriter`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
from scipy import sparse

from vcell.data.layout import check_stored_matrices
from vcell.errors import VcellError, lock_hint

log = logging.getLogger("vcell.data.preprocess")

#: Stored values (non-zeros of a CSR matrix, entries of a dense one) read per block: ~130 MB of
#: float32 values and int32 indices, a few times that while a block is transformed.
BLOCK_VALUES = 1 << 24
MAX_BLOCK_ROWS = 16384


@contextlib.contextmanager
def no_progress(description: str, total: float | None = None, unit: str = "") -> Iterator:
    """The default progress factory: a line whose ``advance`` does nothing."""

    class _Line:
        def advance(self, n: float = 1) -> None:
            """Do nothing."""

    yield _Line()


Progress = Callable[..., contextlib.AbstractContextManager]


class MemorySource:
    """A matrix in memory, served as one block (CSR stays CSR, other sparse formats become CSR)."""

    def __init__(self, X):
        if sparse.issparse(X) and X.format != "csr":
            X = X.tocsr()
        self.X = X if sparse.issparse(X) else np.asarray(X)
        self.shape = self.X.shape
        self.dtype = self.X.dtype

    def bounds(self) -> list[tuple[int, int]]:
        """Row ranges of the blocks: one block of every row."""
        return [(0, self.shape[0])]

    def read(self, lo: int, hi: int):
        """Rows ``lo:hi`` (the matrix itself for all rows; never modified by the callers)."""
        return self.X if (lo, hi) == (0, self.shape[0]) else self.X[lo:hi]


def encoding_type(node) -> str:
    """The anndata ``encoding-type`` of an h5py node (``""`` when it has none)."""
    enc = node.attrs.get("encoding-type", "")
    return enc.decode() if isinstance(enc, bytes) else str(enc)


class H5Source:
    """Rows of a matrix of an open ``.h5ad`` file (a CSR group or a dense dataset), read block by block.

    Parameters
    ----------
    node
        The h5py group (CSR) or dataset (dense) of the matrix.
    where
        The file and key, for messages.
    """

    def __init__(self, node, where: str):
        self.where = where
        if isinstance(node, h5py.Group):
            if encoding_type(node) != "csr_matrix":
                raise VcellError(f"{where} is stored as {encoding_type(node) or 'an unknown group'}, not CSR")
            self.sparse = True
            self.shape = tuple(int(s) for s in node.attrs["shape"])
            self.data, self.indices = node["data"], node["indices"]
            self.indptr = node["indptr"][:].astype(np.int64)
            self.dtype = self.data.dtype
        else:
            self.sparse = False
            self.shape = tuple(node.shape)
            self.data, self.dtype = node, node.dtype

    def bounds(self, values: int | None = None, max_rows: int | None = None) -> list[tuple[int, int]]:
        """Row ranges of consecutive blocks of at most ``values`` stored values (default :data:`BLOCK_VALUES`;
        at least one row each) and ``max_rows`` rows (default :data:`MAX_BLOCK_ROWS`)."""
        values = BLOCK_VALUES if values is None else values
        max_rows = MAX_BLOCK_ROWS if max_rows is None else max_rows
        n = self.shape[0]
        if not self.sparse:
            step = max(1, min(max_rows, values // max(1, self.shape[1])))
            return [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        out, lo = [], 0
        while lo < n:
            hi = int(np.searchsorted(self.indptr, self.indptr[lo] + values, side="right")) - 1
            hi = min(max(hi, lo + 1), lo + max_rows, n)
            out.append((lo, hi))
            lo = hi
        return out

    def read(self, lo: int, hi: int):
        """Rows ``lo:hi`` as a CSR matrix (or a dense array)."""
        if not self.sparse:
            return np.asarray(self.data[lo:hi])
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        indptr = self.indptr[lo : hi + 1] - a
        return sparse.csr_matrix((self.data[a:b], self.indices[a:b], indptr), shape=(hi - lo, self.shape[1]))


def iter_blocks(sources: list, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, int, list]]:
    """Yield ``(lo, hi, blocks)``: rows ``lo:hi`` of each of ``sources``, block after block.

    From a file, the next blocks are read by a second thread while the caller works on these
    (h5py reads without the GIL), so reading and computing overlap; one block more is in memory.
    """
    if len(bounds) <= 1 or all(isinstance(src, MemorySource) for src in sources):
        for lo, hi in bounds:
            yield lo, hi, [src.read(lo, hi) for src in sources]
        return
    from concurrent.futures import ThreadPoolExecutor

    def read(i: int) -> list:
        lo, hi = bounds[i]
        return [src.read(lo, hi) for src in sources]

    with ThreadPoolExecutor(1, thread_name_prefix="vcell-read") as pool:
        pending = pool.submit(read, 0)
        for i, (lo, hi) in enumerate(bounds):
            blocks = pending.result()
            if i + 1 < len(bounds):
                pending = pool.submit(read, i + 1)
            yield lo, hi, blocks


def matrix_source(f: h5py.File, key: str, path: Path):
    """A block source for matrix ``key`` of the open file ``f``: streamed when CSR or dense, else read whole."""
    node = f[key]
    where = f"{path}: {key}"
    if isinstance(node, h5py.Dataset) or encoding_type(node) == "csr_matrix":
        return H5Source(node, where)
    from anndata.io import read_elem

    log.warning("%s is stored as %s, which cannot be read by rows: it is read into memory whole "
                "(store it as CSR to stream it)", where, encoding_type(node) or "an unknown group")
    try:
        return MemorySource(read_elem(node))
    except Exception as exc:
        raise VcellError(f"{where}: unreadable matrix ({type(exc).__name__}: {exc})") from exc


ANNOTATIONS = ("obs", "var", "uns", "obsm", "varm", "obsp", "varp")


def read_annotations(f: h5py.File, path: Path) -> dict:
    """``obs``, ``var``, ``uns``, ``obsm``, ``varm``, ``obsp``, ``varp`` of an open ``.h5ad`` (never ``X`` or layers)."""
    from anndata.io import read_elem

    out = {}
    for key in ANNOTATIONS:
        if key not in f:
            continue
        try:
            out[key] = read_elem(f[key])
        except Exception as exc:
            raise VcellError(f"{path}: unreadable .h5ad file ({key}: {type(exc).__name__}: {exc})") from exc
    if "obs" not in out or "var" not in out:
        raise VcellError(f"{path}: unreadable .h5ad file (no obs or var)")
    return out


def layer_names(f: h5py.File) -> list[str]:
    """Names of the layers stored in the open file."""
    return list(f["layers"].keys()) if "layers" in f and isinstance(f["layers"], h5py.Group) else []


@contextlib.contextmanager
def open_input(path: Path) -> Iterator[tuple[h5py.File, dict, object]]:
    """Open an ``.h5ad`` for streaming: yields the h5py file, its annotations and a block source of ``X``."""
    path = Path(path)
    if not path.exists():
        raise VcellError(f"{path}: file not found")
    if path.is_dir():
        raise VcellError(f"{path}: is a directory, expected an .h5ad file")
    if not h5py.is_hdf5(path):
        raise VcellError(f"{path}: unreadable file (not an HDF5/.h5ad file)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VcellError(f"{path}: unreadable .h5ad file ({exc}){lock_hint(exc)}") from exc
    with f:
        check_stored_matrices(path, f)
        ann = read_annotations(f, path)
        source = matrix_source(f, "X", path)
        if source.shape != (len(ann["obs"]), len(ann["var"])):
            raise VcellError(f"{path}: X is {source.shape[0]} x {source.shape[1]} but obs/var have "
                             f"{len(ann['obs'])} x {len(ann['var'])} rows")
        yield f, ann, source


def _take(block, rows: np.ndarray | None, cols: np.ndarray):
    """Rows ``rows`` (a mask, or all) and columns ``cols`` of a block."""
    if rows is not None:
        block = block[rows]
    return block[:, cols]


def write_preprocessed(f: h5py.File, path: Path, ann: dict, source, plan, tmp: os.PathLike,
                       progress: Progress, finish: Callable, description: str) -> None:
    """Write the output of a preprocessing ``plan`` at ``tmp``, block by block.

    ``X`` gets the log1p values of the kept cells and genes (normalised from counts when
    ``plan.normalize``, with the counts themselves in ``layers["counts"]``); the input's other
    layers are subset the same way; ``finish(skeleton, plan)`` adds the plan's records to the
    subset annotations. The input's ``raw`` is copied as it is when no cell is dropped.
    """
    from anndata.io import write_elem

    from vcell.data.h5write import H5adWriter
    from vcell.data.normalize import log1p_normalize

    keep, cols = plan.keep_cells, plan.cols
    sources = {"X": source}
    dtypes = {"X": np.dtype(np.float32) if plan.normalize else source.dtype}
    for name in layer_names(f):
        if not (plan.normalize and name == "counts"):  # replaced by X's counts, as in memory
            sources[f"layers/{name}"] = matrix_source(f, f"layers/{name}", path)
            dtypes[f"layers/{name}"] = sources[f"layers/{name}"].dtype
    if plan.normalize:
        sources["layers/counts"] = source
        dtypes["layers/counts"] = source.dtype
    for key, src in sources.items():
        if src.shape[0] != source.shape[0]:
            raise VcellError(f"{path}: {key} has {src.shape[0]} rows, X has {source.shape[0]}")
    extra = {}
    if "raw" in f:
        if keep is None:
            extra["raw"] = f["raw"]
        else:
            log.warning("%s: .raw is not written to the output (knockdown QC dropped cells, and .raw is "
                        "kept only when every cell is)", path)

    skeleton = subset_annotations(ann, keep, cols)
    finish(skeleton, plan)
    with H5adWriter(tmp, n_vars=len(cols), matrices=tuple(sources), dtype=dtypes) as writer, \
            progress(description, total=source.shape[0], unit="cells") as line:
        distinct = list({id(src): src for src in sources.values()}.values())
        for lo, hi, got in iter_blocks(distinct, source.bounds()):
            read = {id(src): block for src, block in zip(distinct, got, strict=True)}
            rows = None if keep is None else keep[lo:hi]
            x = read[id(source)]
            blocks = {}
            if plan.normalize:
                totals = plan.rows.totals(lo, x)
                counts = _take(x, rows, cols)
                blocks["X"] = log1p_normalize(counts, totals if rows is None else totals[rows], plan.target_sum)
                blocks["layers/counts"] = counts
            for key, src in sources.items():
                if key not in blocks:
                    blocks[key] = _take(read[id(src)], rows, cols)
            writer.append(**{key.replace("/", "_"): block for key, block in blocks.items()})
            line.advance(hi - lo)
        writer.finish(skeleton.obs, skeleton.var, dict(skeleton.uns), dict(skeleton.obsm))
    with h5py.File(tmp, "a") as g:
        for key in ("varm", "obsp", "varp"):
            elem = dict(getattr(skeleton, key))
            if elem:
                del g[key]
                write_elem(g, key, elem)
        for key, node in extra.items():
            f.copy(node, g, name=key)


def subset_annotations(ann: dict, keep_cells: np.ndarray | None, cols: np.ndarray):
    """The AnnData skeleton (no matrix) of the kept cells and genes, subset as AnnData subsets them."""
    import anndata as ad

    skel = ad.AnnData(obs=ann["obs"], var=ann["var"], uns=ann.get("uns", {}),
                      **{k: ann[k] for k in ("obsm", "varm", "obsp", "varp") if k in ann and len(ann[k])})
    rows = slice(None) if keep_cells is None else keep_cells
    return skel[rows, cols].copy()
