"""Preprocessing of single-cell perturbation AnnData: normalisation, gene selection, knockdown QC.

:func:`preprocess` runs the pipeline and :func:`preprocess_file` runs it file to file (``vcell
data preprocess``). The steps live in their own modules and are re-exported here:
:func:`normalize_log1p` (:mod:`vcell.data.normalize`), :func:`select_hvg` and
:func:`subset_genes` (:mod:`vcell.data.gene_selection`), :func:`knockdown_qc` and its statuses
(:mod:`vcell.data.knockdown`).

Every function takes an :class:`~anndata.AnnData` plus keyword options and returns a new object;
the input is never modified in place.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import pandas as pd

from vcell.data.gene_selection import select_hvg, subset_genes
from vcell.data.io import check_output_path, read_h5ad, write_h5ad
from vcell.data.knockdown import (
    DROP_STATUSES,
    REPORT_COLUMNS,
    STATUS_CONTROL,
    STATUS_KEPT,
    STATUS_NO_CONTROL_EXPR,
    STATUS_NOT_KNOCKED_DOWN,
    STATUS_NOT_MEASURED,
    STATUS_TOO_FEW_CELLS,
    _bad_expression,
    _check_columns,
    knockdown_qc,
)
from vcell.data.normalize import _require_x, _vcell_uns, normalize_log1p
from vcell.data.spec import EXPRESSION_TYPES, DataSpec, split_combo
from vcell.errors import VcellError

__all__ = [
    "DROP_STATUSES", "REPORT_COLUMNS", "STATUS_CONTROL", "STATUS_KEPT", "STATUS_NOT_KNOCKED_DOWN",
    "STATUS_NOT_MEASURED", "STATUS_NO_CONTROL_EXPR", "STATUS_TOO_FEW_CELLS", "knockdown_qc",
    "normalize_log1p", "preprocess", "preprocess_file", "select_hvg", "subset_genes",
]

logger = logging.getLogger(__name__)


_knockdown_qc = knockdown_qc  # `preprocess` has a parameter of the same name


def _target_genes(adata: ad.AnnData, spec: DataSpec) -> list[str]:
    """Perturbation target genes present in ``var_names``, in first-seen order."""
    labels = pd.unique(adata.obs[spec.pert_col].astype(str))
    present = set(adata.var_names)
    targets = (t for lab in labels if lab != str(spec.control) for t in split_combo(lab))
    return [t for t in dict.fromkeys(targets) if t in present]


def _records(df: pd.DataFrame) -> list[dict]:
    """DataFrame rows as JSON-friendly dicts (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.astype(object).to_dict(orient="records")]


def preprocess(
    adata: ad.AnnData,
    spec: DataSpec,
    *,
    target_sum: float = 1e4,
    n_top_genes: int | None = 2000,
    subset_hvg: bool = True,
    genes: Sequence[str] | str | os.PathLike | None = None,
    knockdown_qc: bool = False,
    residual_expression: float = 0.30,
    cell_residual_expression: float | None = None,
    min_cells: int = 30,
) -> tuple[ad.AnnData, dict]:
    """Run the preprocessing pipeline.

    Order: normalise + log1p (only if ``spec.expression == "counts"``), knockdown QC on all genes
    (so target genes are still measured), then the gene subset: ``genes`` if given, otherwise
    highly variable genes plus the perturbation targets present in the data.

    Parameters
    ----------
    adata
        Cells x genes; not modified.
    spec
        Column conventions; ``spec.expression`` must be set (``"counts"`` or ``"log1p"``).
    target_sum
        Normalisation target per cell (counts input only).
    n_top_genes
        Number of highly variable genes; ``None`` skips HVG selection.
    subset_hvg
        Subset to HVGs + targets; if False only ``var["highly_variable"]`` is marked.
    genes
        Gene list (or path to one) to keep instead of HVG selection.
    knockdown_qc
        Run :func:`knockdown_qc` with ``residual_expression``, ``cell_residual_expression`` and
        ``min_cells``.

    Returns
    -------
    AnnData
        The preprocessed object (log1p in ``X``; raw counts in ``layers["counts"]`` for counts input).
    dict
        Summary: cell/gene counts before and after, the steps run and the QC drops.
    """
    do_qc = knockdown_qc
    if spec.expression is None:
        raise VcellError("expression type not set")
    if spec.expression not in EXPRESSION_TYPES:
        raise VcellError(_bad_expression(spec.expression))
    _require_x(adata, "preprocess")
    _check_columns(adata, spec)
    if spec.batch_col is not None and spec.batch_col not in adata.obs:
        raise VcellError(f"batch column '{spec.batch_col}' not found in .obs")

    summary: dict = {
        "n_cells_before": int(adata.n_obs),
        "n_genes_before": int(adata.n_vars),
        "expression_input": spec.expression,
        "normalized": False,
        "steps": [],
    }
    if spec.expression == "counts":
        out = normalize_log1p(adata, target_sum=target_sum)
        summary["normalized"] = True
        summary["target_sum"] = float(target_sum)
        summary["steps"].append("normalize_log1p")
    else:
        logger.info("expression is already log1p: skipping normalisation")
        out = adata.copy()
        if "log1p" not in out.uns:
            out.uns["log1p"] = {"base": None}
        meta = _vcell_uns(out)
        meta["expression"] = "log1p"
        out.uns["vcell"] = meta
    log_spec = spec.with_(expression="log1p")

    # QC needs the target genes, which a gene subset may remove, so it runs first.
    if do_qc:
        out, report = _knockdown_qc(out, log_spec, residual_expression=residual_expression,
                                    cell_residual_expression=cell_residual_expression,
                                    min_cells=min_cells)
        dropped = report[report["status"].isin(DROP_STATUSES)]
        summary["steps"].append("knockdown_qc")
        summary["n_groups_dropped_qc"] = int(len(dropped))
        summary["n_cells_dropped_qc"] = int(summary["n_cells_before"] - out.n_obs)
        summary["perturbations_dropped_qc"] = sorted(set(dropped["perturbation"]))
        summary["n_perturbations_dropped_qc"] = len(summary["perturbations_dropped_qc"])
        summary["groups_dropped_qc"] = [
            {"context": c, "perturbation": p, "status": s}
            for c, p, s in dropped[["context", "perturbation", "status"]].itertuples(index=False)
        ]
        summary["n_targets_not_measured_qc"] = int((report["status"] == STATUS_NOT_MEASURED).sum())
        summary["knockdown_report"] = _records(report)

    if genes is not None:
        out = subset_genes(out, genes)
        summary["steps"].append("subset_genes")
    elif n_top_genes is not None:
        targets = _target_genes(out, spec)
        out = select_hvg(out, n_top_genes=n_top_genes, subset=subset_hvg, keep=targets)
        summary["steps"].append("select_hvg")
        summary["n_top_genes"] = int(n_top_genes)
        summary["n_target_genes_kept"] = int(out.var_names.isin(targets).sum())

    summary["n_cells_after"] = int(out.n_obs)
    summary["n_genes_after"] = int(out.n_vars)
    labels = out.obs[spec.pert_col].astype(str)
    summary["n_perturbations_after"] = int(labels[labels != str(spec.control)].nunique())
    logger.info(
        "preprocess: %d x %d -> %d x %d (cells x genes)",
        summary["n_cells_before"], summary["n_genes_before"], out.n_obs, out.n_vars,
    )
    return out, summary


def preprocess_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    spec: DataSpec,
    *,
    overwrite: bool = False,
    **options,
) -> dict:
    """Read ``in_path``, run :func:`preprocess`, write the result atomically to ``out_path``.

    Parameters
    ----------
    in_path, out_path
        Input and output ``.h5ad`` files; they must differ (inputs are never modified).
    spec
        Column conventions; ``spec.expression`` must be set.
    overwrite
        Replace an existing ``out_path``.
    **options
        Keyword options of :func:`preprocess`.

    Returns
    -------
    dict
        The :func:`preprocess` summary plus ``input`` and ``output`` paths.
    """
    if spec.expression is None:
        raise VcellError("expression type not set")
    in_path, out_path = Path(in_path), Path(out_path)
    check_output_path(out_path, [in_path], overwrite=overwrite)
    adata = read_h5ad(in_path)
    out, summary = preprocess(adata, spec, **options)
    write_h5ad(out, out_path)
    logger.info("wrote %s", out_path)
    return summary | {"input": str(in_path), "output": str(out_path)}
