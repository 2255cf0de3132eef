"""Library-size normalisation and log1p of raw counts, and helpers shared by the preprocessing steps.

Every function takes an :class:`~anndata.AnnData` plus keyword options and returns a new object;
the input is never modified in place.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping

import anndata as ad
import numpy as np
import scanpy as sc
from scipy import sparse

from vcell.errors import VcellError

# One logger for the whole preprocessing pipeline (`vcell data preprocess`), whichever module logs.
logger = logging.getLogger("vcell.data.preprocess")


def _vcell_uns(adata: ad.AnnData) -> dict:
    """A fresh copy of ``uns["vcell"]`` (so edits never reach a shared dict); ``{}`` when it is not a mapping."""
    meta = adata.uns.get("vcell", {})
    if not isinstance(meta, Mapping):
        logger.warning("uns['vcell'] is a %s, not a mapping of vcell's metadata: ignored", type(meta).__name__)
        return {}
    return dict(meta)


def _require_x(adata: ad.AnnData, what: str) -> None:
    if adata.isbacked:
        raise VcellError(f"{what}: the data is opened backed (on disk); load it into memory first")
    if adata.X is None:
        raise VcellError(f"{what}: the AnnData has no expression matrix X")


def _as_float32(x):
    """X as float32, keeping its sparse format (CSR stays CSR) or making it a dense ndarray."""
    if sparse.issparse(x):
        return x.astype(np.float32, copy=True)
    return np.array(x, dtype=np.float32, copy=True)


def _values(x) -> np.ndarray:
    """The stored values of a dense or sparse matrix (cheap checks on counts)."""
    return x.data if sparse.issparse(x) else np.asarray(x)


def normalize_log1p(adata: ad.AnnData, target_sum: float = 1e4, counts_layer: str = "counts") -> ad.AnnData:
    """Library-size normalise and log1p-transform raw counts.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` (dense or sparse).
    target_sum
        Total count of every cell after normalisation.
    counts_layer
        Layer that receives an unmodified copy of the raw counts.

    Returns
    -------
    AnnData
        A new object with float32 ``log1p(normalised counts)`` in ``X`` (sparse format kept),
        ``layers[counts_layer]``, ``uns["log1p"]`` and ``uns["vcell"]`` (``expression="log1p"``,
        ``target_sum``).
    """
    _require_x(adata, "normalize_log1p")
    if not (isinstance(target_sum, numbers.Real) and math.isfinite(target_sum) and target_sum > 0):
        raise VcellError(f"target_sum must be a positive number, got {target_sum!r}")
    if "log1p" in adata.uns:
        raise VcellError("X is already log1p-transformed (uns['log1p'] is present); expected raw counts")
    vals = _values(adata.X)
    if vals.size and np.nanmin(vals) < 0:
        raise VcellError("X has negative values; expected raw counts")
    if vals.size and not np.all(np.isfinite(vals)):
        raise VcellError("X has NaN or infinite values; expected raw counts")
    if vals.size and not np.array_equal(vals, np.round(vals)):
        logger.warning("X has non-integer values; normalising them as if they were counts")

    out = adata.copy()
    out.layers[counts_layer] = adata.X.copy()
    out.X = _as_float32(adata.X)
    n_empty = int(np.sum(np.asarray(out.X.sum(axis=1)).ravel() == 0))
    if n_empty:
        logger.warning("%d cells have zero total counts; they stay all-zero after normalisation", n_empty)
    sc.pp.normalize_total(out, target_sum=float(target_sum))
    sc.pp.log1p(out)
    if out.X.dtype != np.float32:  # scanpy keeps float32 today; do not rely on it
        out.X = out.X.astype(np.float32)
    meta = _vcell_uns(out)
    meta.update(expression="log1p", target_sum=float(target_sum))
    out.uns["vcell"] = meta
    logger.info("normalised %d cells to %g counts and log1p-transformed", out.n_obs, target_sum)
    return out

