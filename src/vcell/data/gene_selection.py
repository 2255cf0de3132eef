"""Gene selection: highly variable genes (scanpy's ``"seurat"`` flavor) or an explicit gene list.

Highly variable genes are computed from per-gene moments (:class:`~vcell.data.stats.GeneMoments`)
by :func:`hvg_table`, which follows scanpy's ``highly_variable_genes(flavor="seurat")`` step by
step (dispersion = var / mean of ``expm1(X)``, 20 mean bins, normalised dispersion, the same ties
and edge cases): :func:`select_hvg` adds up the moments of a matrix in memory in one block, ``vcell
data preprocess`` of a file streamed in blocks.

Every function that takes an :class:`~anndata.AnnData` returns a new object; the input is never
modified in place.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from vcell.data.normalize import _require_x, _vcell_uns
from vcell.data.stats import GeneMoments
from vcell.errors import VcellError, preview

# One logger for the whole preprocessing pipeline (`vcell data preprocess`), whichever module logs.
logger = logging.getLogger("vcell.data.preprocess")

N_BINS = 20  # mean bins of the seurat flavor (scanpy's default)


def check_n_top_genes(n_top_genes) -> int:
    """``n_top_genes`` as an int, or a one-line error unless it is a positive integer."""
    if not isinstance(n_top_genes, int | np.integer) or isinstance(n_top_genes, bool) or n_top_genes < 1:
        raise VcellError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
    return int(n_top_genes)


def hvg_values(block, log_base: float | None = None):
    """``expm1`` of a block of log1p values, in the block's float dtype (float32 for others), as scanpy's seurat flavor.

    CSR stays CSR; the input is not modified.
    """
    if sparse.issparse(block):
        block = block if block.format == "csr" else block.tocsr()
        vals = block.data
    else:
        vals = np.asarray(block)
    vals = vals.astype(np.float32) if vals.dtype.kind != "f" or vals.dtype == np.float16 else vals.copy()
    if log_base is not None:
        np.multiply(vals, np.log(log_base), out=vals)
    np.expm1(vals, out=vals)
    if sparse.issparse(block):
        return sparse.csr_matrix((vals, block.indices, block.indptr), shape=block.shape)
    return vals


def _nth_highest_cutoff(dispersion_norm: np.ndarray, n: int) -> float:
    finite = dispersion_norm[~np.isnan(dispersion_norm)]
    if finite.size == 0:
        raise IndexError("no gene has a normalised dispersion")
    if n > finite.size:
        logger.warning("%d genes asked, but only %d have a normalised dispersion: keeping those", n, finite.size)
        n = finite.size
    finite[::-1].sort()
    return finite[n - 1]


def _one_batch(mean: np.ndarray, var: np.ndarray, n_top_genes: int) -> pd.DataFrame:
    """scanpy's ``_highly_variable_genes_single_batch`` (seurat flavor, ``n_top_genes``) from means and variances."""
    mean = mean.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean[mean == 0] = 1e-12
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
        mean = np.log1p(mean)
        df = pd.DataFrame({"means": mean, "dispersions": dispersion})
        df["mean_bin"] = pd.cut(df["means"], bins=N_BINS)
        stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
        one_gene = stats["dev"].isnull()  # a bin with one gene: its normalised dispersion is 1
        if np.flatnonzero(one_gene.loc[df["mean_bin"]]).size:
            stats.loc[one_gene, "dev"] = stats.loc[one_gene, "avg"]
            stats.loc[one_gene, "avg"] = 0
        stats = stats.loc[df["mean_bin"]].set_index(df.index)
        df["dispersions_norm"] = (df["dispersions"] - stats["avg"]) / stats["dev"]
        norm = df["dispersions_norm"].to_numpy()
        cutoff = _nth_highest_cutoff(norm.copy(), min(n_top_genes, len(df)))
        df["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cutoff
    return df


def _no_hvg_error(n_top_genes: int, n_vars: int, n_obs: int):
    return VcellError(
        f"highly variable genes: fewer than {n_top_genes} of the {n_vars} genes vary across the {n_obs} cells "
        "(in each batch); lower --n-top-genes or give the genes to keep with --genes"
    )


def hvg_table(moments: GeneMoments, var_names: Sequence[str], n_top_genes: int, batches: Sequence[str] | None = None) -> pd.DataFrame:
    """Highly variable genes from the moments of ``expm1`` of log1p data (:func:`hvg_values`).

    Parameters
    ----------
    moments
        Per-gene moments, one group per batch (or one group).
    var_names
        Gene names, in column order.
    n_top_genes
        Number of genes selected.
    batches
        Names of the moments' groups when they are batches: genes are ranked within each batch
        (on the genes expressed there) and combined as scanpy does with ``batch_key``.

    Returns
    -------
    DataFrame
        Indexed by ``var_names``: ``highly_variable``, ``means``, ``dispersions``,
        ``dispersions_norm`` (float32), and with batches ``highly_variable_nbatches`` and
        ``highly_variable_intersection``.
    """
    index = pd.Index(var_names)
    n_obs = int(moments.n_cells.sum())
    if batches is None:
        try:
            df = _one_batch(*moments.mean_var(0), n_top_genes)
        except IndexError:
            raise _no_hvg_error(n_top_genes, len(index), n_obs) from None
        df.index = index
        cols = ["highly_variable", "means", "dispersions", "dispersions_norm"]
    else:
        frames = []
        for b in range(len(batches)):
            expressed = moments.npos[b] > 0
            try:
                part = _one_batch(*moments.mean_var(b, expressed), n_top_genes)
            except IndexError:
                raise _no_hvg_error(n_top_genes, len(index), n_obs) from None
            part.index = index[expressed]
            if not expressed.all():
                missing = pd.DataFrame(np.zeros((int((~expressed).sum()), len(part.columns))), columns=part.columns)
                missing["highly_variable"] = missing["highly_variable"].astype(bool)
                missing.index = index[~expressed]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # concat of a categorical and a float column
                    part = pd.concat([part, missing]).loc[index]
            frames.append(part)
        df = pd.concat(frames, axis=0)
        df["highly_variable"] = df["highly_variable"].astype(int)
        df = df.groupby(df.index, observed=True).agg(
            {"means": "mean", "dispersions": "mean", "dispersions_norm": "mean", "highly_variable": "sum"})
        df["highly_variable_nbatches"] = df["highly_variable"]
        df["highly_variable_intersection"] = df["highly_variable_nbatches"] == len(batches)
        df = df.sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last")
        df["highly_variable"] = np.arange(df.shape[0]) < n_top_genes
        df = df.loc[index]
        cols = ["highly_variable", "means", "dispersions", "dispersions_norm",
                "highly_variable_nbatches", "highly_variable_intersection"]
    df = df[cols].copy()
    df["dispersions_norm"] = df["dispersions_norm"].astype(np.float32)
    return df


def select_hvg(
    adata: ad.AnnData,
    n_top_genes: int = 2000,
    subset: bool = True,
    keep: Iterable[str] = (),
    batch_key: str | None = None,
) -> ad.AnnData:
    """Select highly variable genes (scanpy, flavor ``"seurat"``) on log1p data.

    Parameters
    ----------
    adata
        Cells x genes with log1p-normalised expression in ``X``.
    n_top_genes
        Number of highly variable genes. ``>= n_vars`` keeps every gene.
    subset
        Keep only the HVGs plus ``keep`` genes (original gene order); otherwise only mark them.
    keep
        Genes always kept when present (e.g. perturbation targets); absent ones are ignored.
    batch_key
        Optional ``.obs`` column: select HVGs within each batch and combine (scanpy semantics).

    Returns
    -------
    AnnData
        A new object with ``var["highly_variable"]`` set.
    """
    _require_x(adata, "select_hvg")
    n_top_genes = check_n_top_genes(n_top_genes)
    if batch_key is not None and batch_key not in adata.obs:
        raise VcellError(f"batch column '{batch_key}' not found in .obs")
    if "log1p" not in adata.uns and _vcell_uns(adata).get("expression") != "log1p":
        logger.warning("select_hvg: no uns['log1p'] record; assuming X is log1p-normalised")

    keep = [keep] if isinstance(keep, str) else list(keep)
    if n_top_genes >= adata.n_vars:
        logger.warning("n_top_genes=%d >= number of genes (%d): keeping all genes", n_top_genes, adata.n_vars)
        out = adata.copy()
        out.var["highly_variable"] = True
        return out

    batches, groups = None, None
    if batch_key is not None:
        labels = adata.obs[batch_key]
        labels = labels if isinstance(labels.dtype, pd.CategoricalDtype) else labels.astype("category")
        present = labels.cat.remove_unused_categories()
        batches = [str(c) for c in present.cat.categories]
        groups = present.cat.codes.to_numpy()
    moments = GeneMoments(adata.n_vars, 1 if batches is None else len(batches))
    moments.add(hvg_values(adata.X, log_base(adata.uns)), groups)
    table = hvg_table(moments, adata.var_names, n_top_genes, batches)
    hv = table["highly_variable"].to_numpy(dtype=bool)
    keep_mask = adata.var_names.isin(keep)
    log_selection(hv, keep_mask, len(set(keep)))
    out = adata[:, hv | keep_mask].copy() if subset else adata.copy()
    rows = slice(None) if not subset else hv | keep_mask
    for col in table.columns:
        out.var[col] = table[col].to_numpy()[rows]
    if out.X.dtype.kind != "f" or out.X.dtype == np.float16:  # as scanpy left it: X in the dtype expm1 ran in
        out.X = out.X.astype(np.float32)
    out.uns["hvg"] = {"flavor": "seurat"}
    return out


def log_selection(hv: np.ndarray, keep_mask: np.ndarray, n_keep: int) -> None:
    """Say how many genes were selected, and how the genes kept besides (targets) fared, if any were asked for."""
    kept = f"; {int(keep_mask.sum())} of {n_keep} genes to keep present ({int((keep_mask & ~hv).sum())} not already HVG)" if n_keep else ""
    logger.info("selected %d highly variable genes%s", int(hv.sum()), kept)


def log_base(uns) -> float | None:
    """The log base recorded in ``uns["log1p"]`` (``None``: natural log)."""
    rec = uns.get("log1p") if hasattr(uns, "get") else None
    base = rec.get("base") if hasattr(rec, "get") else None
    return None if base is None or (isinstance(base, float) and math.isnan(base)) else float(base)


def _read_gene_list(path: Path) -> list[str]:
    if not path.exists():
        raise VcellError(f"{path}: gene list file not found")
    if path.is_dir():
        raise VcellError(f"{path}: is a directory, expected a text file with one gene per line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VcellError(f"{path}: unreadable gene list ({exc})") from exc
    genes = [ln.strip() for ln in text.splitlines()]
    return [g for g in genes if g and not g.startswith("#")]


def gene_positions(var_names: pd.Index, genes: Sequence[str] | str | os.PathLike, allow_missing: bool = False) -> np.ndarray:
    """Column positions of ``genes`` (names, or a text file of one per line) in ``var_names``, in the given order.

    Duplicates are kept once; genes absent from ``var_names`` raise :class:`VcellError` unless
    ``allow_missing`` (then they are skipped with a warning). See :func:`subset_genes`.
    """
    source = "gene list"
    if isinstance(genes, str | os.PathLike):
        path = Path(genes)
        genes = _read_gene_list(path)
        source = str(path)
    genes = [str(g) for g in genes]
    unique = list(dict.fromkeys(genes))
    if len(unique) < len(genes):
        logger.warning("%s: %d duplicated gene names ignored", source, len(genes) - len(unique))
    if not unique:
        raise VcellError(f"{source}: no genes given")

    var_names = pd.Index(var_names)
    if not var_names.is_unique:
        dup = set(var_names[var_names.duplicated()].unique())
        clash = [g for g in unique if g in dup]
        if clash:
            raise VcellError(
                f"gene names are not unique in the data (e.g. '{clash[0]}'); "
                "make var_names unique before subsetting"
            )
    present_set = set(var_names)
    missing = [g for g in unique if g not in present_set]
    if missing:
        msg = f"{source}: {len(missing)} of {len(unique)} genes not found in the data: {preview(missing)}"
        if not allow_missing:
            raise VcellError(msg)
        logger.warning("%s; keeping the %d present", msg, len(unique) - len(missing))
    present = [g for g in unique if g in present_set]
    if not present:
        raise VcellError(f"{source}: none of the {len(unique)} genes are in the data")
    first = {}
    for i, g in enumerate(var_names):
        first.setdefault(g, i)
    return np.array([first[g] for g in present], dtype=np.int64)


def subset_genes(
    adata: ad.AnnData, genes: Sequence[str] | str | os.PathLike, allow_missing: bool = False
) -> ad.AnnData:
    """Keep the given genes, in the given order.

    Parameters
    ----------
    adata
        Cells x genes.
    genes
        Gene names (matched against ``var_names``), or a path to a text file with one gene per
        line (blank lines and ``#`` comments ignored). Duplicates are kept once.
    allow_missing
        If False, genes absent from the data raise :class:`VcellError`; if True they are skipped
        with a warning.

    Returns
    -------
    AnnData
        A new object with exactly the requested (present) genes.
    """
    return adata[:, gene_positions(adata.var_names, genes, allow_missing)].copy()
