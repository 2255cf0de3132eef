"""The 2025 metrics per context (cell line, cell type): ``vcell eval run --profile vcc
--context-col COL``, as cell-eval 0.8's ``run --celltype-col`` scores each cell type apart.

Each context's cells (its perturbations and its own controls) are copied out of every file into
the run's scratch folder, one context at a time (:func:`write_cells`: CSR rows window by window),
and that pair of files is scored as ``vcell eval run`` scores any pair, within the same memory
budget (:func:`vcell.eval.run.run_many`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vcell.data.labels import factorize
from vcell.data.spec import column_guess
from vcell.data.subset import write_cells
from vcell.errors import VcellError, preview


def _contexts(adata, column: str, where: str) -> np.ndarray:
    """Each cell's context (as a string), the column checked: present and without missing values."""
    if column not in adata.obs.columns:
        raise VcellError(f"{where}: context column {column!r} not found in obs{column_guess(column, adata.obs.columns, 'context')} "
                         f"(columns: {preview(list(adata.obs.columns), 12)})")
    codes, names = factorize(adata.obs[column])
    if (codes < 0).any():
        first = adata.obs_names[int(np.flatnonzero(codes < 0)[0])]
        raise VcellError(f"{where}: {int((codes < 0).sum())} cell(s) without a context in column {column!r} (first: {first!r})")
    return np.asarray(names, dtype=object).astype(str)[codes]


def context_masks(metas: Mapping[str, object], paths: Mapping[str, Path], column: str, real: str) -> dict[str, dict[str, np.ndarray]]:
    """context -> file key -> mask of its cells, for the files ``metas`` (key -> AnnData, backed is
    fine; ``real`` is the reference's key). Every file must hold the reference's contexts, and no other."""
    labels = {key: _contexts(meta, column, str(paths[key])) for key, meta in metas.items()}
    contexts = sorted(str(c) for c in set(labels[real]))
    if not contexts:
        raise VcellError(f"{paths[real]}: no cells")
    if "" in contexts:  # its folder would be OUT itself, beside the other contexts' folders
        raise VcellError(f"{paths[real]}: cells with an empty context name in column {column!r}; name every context")
    for key, values in labels.items():
        only_pred, only_real = sorted(set(values) - set(contexts)), sorted(set(contexts) - set(values))
        if only_pred or only_real:
            parts = ([f"{preview(only_real, 3)} only in {paths[real]}"] if only_real else []) + \
                    ([f"{preview(only_pred, 3)} only in {paths[key]}"] if only_pred else [])
            raise VcellError(f"the contexts in column {column!r} differ: {'; '.join(parts)}; predict every context of {paths[real]}")
    return {c: {key: values == c for key, values in labels.items()} for c in contexts}


def write_context_files(paths: Mapping[str, Path], masks: Mapping[str, np.ndarray], folder: Path, tag: str,
                        budget: float = math.inf) -> dict[str, Path]:
    """Copy each file's cells of one context (``masks[key]``) into ``folder``; returns key -> the copy.

    Only ``X`` and the annotations are copied (the evaluator reads nothing else). CSR rows are
    copied in windows within ``budget`` bytes; a dense ``X`` is read for the context's rows at once.
    """
    window = int(min(32_000_000, max(100_000, budget / 16)))  # ~16 bytes a non-zero while a window is copied
    copies = {}
    for i, (key, path) in enumerate(paths.items()):
        copies[key] = Path(folder) / f"{tag}.{i}.h5ad"
        write_cells(path, masks[key], copies[key], layers=False, window_nnz=window).file.close()
    return copies


def remove_files(paths: Mapping[str, os.PathLike]) -> None:
    """Remove a context's copies once it is scored (disk holds one context's at a time)."""
    for path in paths.values():
        Path(path).unlink(missing_ok=True)
