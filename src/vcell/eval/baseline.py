"""The VCC "cell-mean" baseline: every perturbed cell predicted as one mean vector.

As ``cell-eval baseline``: the vector is the mean over groups of each group's pseudobulk (the
control group is one of the groups), or with ``as_delta`` the mean effect added to nothing (a
delta). Each perturbation gets as many cells as it has in the data (or as a counts table
says), and the real control cells are appended, so the result is ready for ``vcell eval run``.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.aggregate import cell_mean
from vcell.data.labels import factorize
from vcell.errors import VcellError, preview

log = logging.getLogger(__name__)


def cell_mean_vector(adata: ad.AnnData, pert_col: str, control: str, as_delta: bool = False) -> np.ndarray:
    """The baseline vector: the mean of the group pseudobulks, as ``cell-eval baseline``.

    Parameters
    ----------
    adata : anndata.AnnData
        log1p expression in ``X``; every label of ``obs[pert_col]`` is one group, the control
        included.
    pert_col : str
        ``obs`` column with the perturbation of each cell.
    control : str
        Label of the control cells.
    as_delta : bool
        The mean effect versus the control pseudobulk instead.

    Returns
    -------
    numpy.ndarray
        ``[n_genes]``, in ``X``'s floating dtype (group means rounded to it, as cell-eval's
        polars group means); see :func:`vcell.data.aggregate.cell_mean`.
    """
    codes, groups = factorize(adata.obs[pert_col])
    if control not in set(groups):
        raise VcellError(f"control label {control!r} not found in column {pert_col!r}")
    control_code = int(np.flatnonzero(groups == control)[0])
    return cell_mean(adata.X, codes, control_code, len(groups), as_delta=as_delta, match_dtype=True)


def read_counts_table(path, pert_col: str, counts_col: str = "n_cells") -> pd.DataFrame:
    """The cells-per-perturbation CSV of ``vcell eval baseline --counts``: columns ``pert_col`` and
    ``counts_col`` (whole numbers >= 0); every fault is a one-line error naming the file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise VcellError(f"{path}: file not found")
    try:
        table = pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise VcellError(f"{path}: not a CSV table ({type(exc).__name__})") from None
    for col in (pert_col, counts_col):
        if col not in table.columns:
            raise VcellError(f"{path}: no column {col!r} (columns: {preview(table.columns, 8)}); "
                             f"the counts table needs {pert_col!r} and {counts_col!r}")
    n = pd.to_numeric(table[counts_col], errors="coerce")
    bad = n.isna() | (n < 0) | (n != n.round())
    if bad.any():
        raise VcellError(f"{path}: column {counts_col!r} holds {str(table[counts_col][bad].iloc[0])!r}; cell counts are whole numbers >= 0")
    return table


def build_cell_mean_baseline(
    adata: ad.AnnData,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    counts: pd.DataFrame | None = None,
    counts_col: str = "n_cells",
    as_delta: bool = False,
) -> ad.AnnData:
    """A baseline prediction: one mean vector per perturbed cell, real controls appended.

    ``adata`` holds log1p expression. ``counts`` (columns ``pert_col`` and ``counts_col``) sets
    how many cells each perturbation gets; by default, as many as in ``adata``.
    """
    if pert_col not in adata.obs.columns:
        raise VcellError(f"perturbation column {pert_col!r} not found in .obs")
    vector = cell_mean_vector(adata, pert_col, control, as_delta)
    if counts is None:
        sizes = adata.obs[pert_col].astype(str).value_counts(sort=False)
        counts = pd.DataFrame({pert_col: sizes.index, counts_col: sizes.to_numpy()})
    for col in (pert_col, counts_col):
        if col not in counts.columns:
            raise VcellError(f"counts table has no column {col!r} (columns: {', '.join(map(str, counts.columns))})")
    counts = counts[counts[pert_col].astype(str) != control]
    labels = np.repeat(counts[pert_col].astype(str).to_numpy(), counts[counts_col].astype(int).to_numpy())
    obs = pd.DataFrame({pert_col: labels}, index=[f"p.{i}" for i in range(len(labels))])
    predicted = ad.AnnData(X=np.tile(vector, (len(labels), 1)), obs=obs, var=adata.var.copy())
    controls = adata[(adata.obs[pert_col].astype(str) == control).to_numpy()]
    controls = controls.to_memory() if controls.isbacked else controls.copy()
    if sp.issparse(controls.X):
        controls.X = controls.X.toarray()
    controls.X = np.asarray(controls.X, dtype=predicted.X.dtype)
    controls.obs = pd.DataFrame({pert_col: controls.obs[pert_col].astype(str).to_numpy()}, index=controls.obs_names)
    out = ad.concat([predicted, controls])
    out.var = adata.var.copy()
    log.info("cell-mean baseline: %d predicted cells of %d perturbations + %d controls", len(labels), len(counts), controls.n_obs)
    return out
