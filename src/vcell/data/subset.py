"""Writing a subset of a file's cells to a new ``.h5ad`` without loading the file's matrices.

:func:`write_cells` copies the chosen rows of every CSR matrix (``X`` and each ``layers``
entry) window by window, so memory holds one window of rows whatever the file's size; ``obs``,
``obsm`` and ``var`` are subset in memory (they are small), ``uns`` is copied. A file whose
matrices are not all CSR (dense ``X``, CSC) is subset through anndata, which reads only the
chosen rows of a dense matrix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.h5write import H5adWriter
from vcell.data.io import atomic_path, read_h5ad, write_h5ad
from vcell.data.preprocess_stream import encoding_type
from vcell.errors import VcellError, preview

_WINDOW_NNZ = 32_000_000  # non-zeros read per window (~256 MB of float32 values + int32 indices)


def _csr_keys(f: h5py.File, layers: bool = True) -> list[str] | None:
    """HDF5 paths of X and (with ``layers``) every layer when all are CSR, else None."""
    keys = ["X"] + ([f"layers/{k}" for k in f.get("layers", {})] if layers else [])
    if not all(k in f and isinstance(f[k], h5py.Group) and encoding_type(f[k]) == "csr_matrix" for k in keys):
        return None
    return keys


def _windows(indptr: np.ndarray, rows: np.ndarray, budget: int):
    """Runs of ``rows`` (sorted) whose file span holds at most ``budget`` non-zeros (one row at least)."""
    start = 0
    while start < rows.size:
        lo = indptr[rows[start]]
        stop = int(np.searchsorted(indptr[rows + 1], lo + budget, side="right"))
        stop = max(stop, start + 1)
        yield rows[start:stop]
        start = stop


def write_cells(
    path: str | os.PathLike,
    mask: np.ndarray,
    out: str | os.PathLike,
    progress: Callable[[int], None] | None = None,
    genes: Sequence[str] | None = None,
    layers: bool = True,
    window_nnz: int | None = None,
) -> ad.AnnData:
    """Write the cells of ``path`` where ``mask`` is true to ``out`` (atomically): ``X``, ``layers``,
    ``obs``, ``var``, ``obsm`` and ``uns`` (a file that is not all CSR: every slot anndata reads).

    Parameters
    ----------
    path
        The source ``.h5ad`` (never modified).
    mask
        Boolean mask over the source's cells.
    out
        The new file.
    progress
        Called with the number of rows written after each window.
    genes
        Keep only these genes, in this order (every name must be in the file); default all.
    layers
        ``False``: leave ``layers`` out (``X``, ``obs``, ``var``, ``obsm`` and ``uns`` only, whatever the layout).
    window_nnz
        Non-zeros of CSR rows read at a time (memory: about 16 bytes each; default 32 million); a
        matrix that is not CSR is read whole for the chosen rows.

    Returns
    -------
    anndata.AnnData
        The new file opened backed (``obs`` in memory, matrices on disk).
    """
    path, out = Path(path), Path(out)
    mask = np.asarray(mask, dtype=bool)
    meta = read_h5ad(path, backed=True)
    try:
        cols = None
        if genes is not None:
            genes = [str(g) for g in genes]
            cols = meta.var_names.get_indexer(genes)
            if (cols < 0).any():
                missing = [g for g, c in zip(genes, cols) if c < 0]
                raise VcellError(f"{path}: {len(missing)} of the {len(genes)} genes asked for are not in the file "
                                 f"(first: {preview(missing)})")
        with h5py.File(path, "r") as f:
            keys = _csr_keys(f, layers)
        if keys is None:
            view = meta[mask] if cols is None else meta[mask, cols]
            if layers:
                sub = view.to_memory()
            else:  # the chosen rows of X alone (to_memory reads every slot: raw, layers, varm, obsp)
                X = view.X
                sub = ad.AnnData(X=X.to_memory() if hasattr(X, "to_memory") else X, obs=view.obs.copy(), var=view.var.copy(),
                                 obsm=dict(view.obsm), uns=dict(meta.uns))
            write_h5ad(sub, out)
            if progress is not None:
                progress(int(mask.sum()))
        else:
            _copy_csr(path, meta, mask, keys, out, progress, cols, window_nnz or _WINDOW_NNZ)
    finally:
        meta.file.close()
    return read_h5ad(out, backed=True)


def _copy_csr(path: Path, meta: ad.AnnData, mask: np.ndarray, keys: list[str], out: Path, progress, cols, window_nnz: int) -> None:
    rows = np.flatnonzero(mask)
    obs = meta.obs.iloc[rows].copy()
    for col in obs.columns:  # categories no remaining cell has would look like empty groups downstream
        if isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = obs[col].cat.remove_unused_categories()
    obsm = {k: np.asarray(v[rows]) if not sp.issparse(v) else v[rows] for k, v in meta.obsm.items()}
    with h5py.File(path, "r") as f, atomic_path(out) as tmp:
        nodes = [f[k] for k in keys]
        indptrs = [n["indptr"][:].astype(np.int64) for n in nodes]
        n_vars = int(nodes[0].attrs["shape"][1])
        var = meta.var.copy() if cols is None else meta.var.iloc[cols].copy()
        with H5adWriter(tmp, len(var), tuple(keys), dtype={k: n["data"].dtype for k, n in zip(keys, nodes)}) as w:
            for part in _windows(indptrs[0], rows, window_nnz):
                a, b = int(part[0]), int(part[-1]) + 1
                blocks = {}
                for key, node, ptr in zip(keys, nodes, indptrs):
                    lo, hi = int(ptr[a]), int(ptr[b])
                    block = sp.csr_matrix((node["data"][lo:hi], node["indices"][lo:hi], ptr[a : b + 1] - lo), shape=(b - a, n_vars))
                    block = block[part - a]
                    blocks[key.replace("/", "_")] = block if cols is None else block[:, cols]
                w.append(**blocks)
                if progress is not None:
                    progress(part.size)
            w.finish(obs, var, uns=meta.uns, obsm=obsm)
