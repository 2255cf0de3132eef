"""Gene selection: highly variable genes (scanpy) or an explicit gene list.

Every function takes an :class:`~anndata.AnnData` plus keyword options and returns a new object;
the input is never modified in place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

from vcell.data.normalize import _require_x, _vcell_uns
from vcell.errors import VcellError, preview

# One logger for the whole preprocessing pipeline (`vcell data preprocess`), whichever module logs.
logger = logging.getLogger("vcell.data.preprocess")


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
    if not isinstance(n_top_genes, int | np.integer) or isinstance(n_top_genes, bool) or n_top_genes < 1:
        raise VcellError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
    if batch_key is not None and batch_key not in adata.obs:
        raise VcellError(f"batch column '{batch_key}' not found in .obs")
    if "log1p" not in adata.uns and _vcell_uns(adata).get("expression") != "log1p":
        logger.warning("select_hvg: no uns['log1p'] record; assuming X is log1p-normalised")

    keep = [keep] if isinstance(keep, str) else list(keep)
    out = adata.copy()
    if n_top_genes >= out.n_vars:
        logger.warning(
            "n_top_genes=%d >= number of genes (%d): keeping all genes", n_top_genes, out.n_vars
        )
        out.var["highly_variable"] = True
        return out

    if out.X.dtype.kind != "f" or out.X.dtype == np.float16:  # scanpy computes in X's dtype (expm1 in place)
        out.X = out.X.astype(np.float32)
    try:
        sc.pp.highly_variable_genes(
            out, n_top_genes=int(n_top_genes), flavor="seurat", batch_key=batch_key, subset=False
        )
    except IndexError:  # scanpy's cut-off: fewer genes with a finite normalised dispersion than n_top_genes
        raise VcellError(
            f"highly variable genes: fewer than {n_top_genes} of the {out.n_vars} genes vary across the {out.n_obs} cells "
            "(in each batch); lower --n-top-genes or give the genes to keep with --genes"
        ) from None
    hv = out.var["highly_variable"].to_numpy(dtype=bool)
    keep_mask = out.var_names.isin(keep)
    logger.info(
        "selected %d highly variable genes; %d of %d 'keep' genes present (%d not already HVG)",
        int(hv.sum()), int(keep_mask.sum()), len(set(keep)), int((keep_mask & ~hv).sum()),
    )
    if not subset:
        return out
    return out[:, hv | keep_mask].copy()


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

    var_names = adata.var_names
    if not var_names.is_unique:
        dup = var_names[var_names.duplicated()].unique()
        clash = [g for g in unique if g in set(dup)]
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
    return adata[:, present].copy()

