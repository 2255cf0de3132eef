"""Preprocessing of single-cell perturbation AnnData: normalisation, gene selection, knockdown QC.

:func:`preprocess` runs the pipeline on an AnnData in memory and :func:`preprocess_file` runs it
file to file (``vcell data preprocess``), streaming the matrix in row blocks so memory does not
grow with the number of cells. Both go through one plan (:func:`plan_preprocess`): passes over
the rows collect the statistics (knockdown QC's target means, the highly variable genes'
moments), then the output is written with the cells and genes kept; a matrix in memory is
simply one block. The steps live in their own modules and are re-exported here:
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
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.gene_selection import (
    check_n_top_genes,
    gene_positions,
    hvg_table,
    hvg_values,
    log_base,
    log_selection,
    select_hvg,
    subset_genes,
)
from vcell.data.io import atomic_path, check_output_path
from vcell.data.knockdown import (
    DROP_STATUSES,
    REPORT_COLUMNS,
    STATUS_CONTROL,
    STATUS_KEPT,
    STATUS_NO_CONTROL_EXPR,
    STATUS_NO_CONTROLS,
    STATUS_NOT_KNOCKED_DOWN,
    STATUS_NOT_MEASURED,
    STATUS_TOO_FEW_CELLS,
    UNTESTED_STATUSES,
    KnockdownStats,
    _bad_expression,
    _check_columns,
    check_qc_options,
    knockdown_qc,
    qc_record,
)
from vcell.data.normalize import (
    _require_x,
    _vcell_uns,
    check_target_sum,
    count_flags,
    log1p_normalize,
    normalize_log1p,
    raise_count_flags,
    row_totals,
)
from vcell.data.preprocess_stream import MemorySource, Progress, iter_blocks, no_progress
from vcell.data.spec import EXPRESSION_TYPES, DataSpec, split_combo
from vcell.data.stats import GeneMoments
from vcell.errors import VcellError

__all__ = [
    "DROP_STATUSES", "REPORT_COLUMNS", "STATUS_CONTROL", "STATUS_KEPT", "STATUS_NOT_KNOCKED_DOWN",
    "STATUS_NOT_MEASURED", "STATUS_NO_CONTROL_EXPR", "STATUS_NO_CONTROLS", "STATUS_TOO_FEW_CELLS", "UNTESTED_STATUSES", "knockdown_qc",
    "normalize_log1p", "plan_preprocess", "preprocess", "preprocess_file", "select_hvg", "subset_genes",
]

logger = logging.getLogger(__name__)


def _target_genes(labels: pd.Series, var_names: pd.Index, spec: DataSpec) -> list[str]:
    """Perturbation target genes present in ``var_names``, in first-seen order."""
    present = set(var_names)
    targets = (t for lab in pd.unique(labels.astype(str)) if lab != str(spec.control) for t in split_combo(lab))
    return [t for t in dict.fromkeys(targets) if t in present]


def _records(df: pd.DataFrame) -> list[dict]:
    """DataFrame rows as JSON-friendly dicts (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.astype(object).to_dict(orient="records")]


class _Rows:
    """Log1p values of row blocks: normalised from counts (checked the first time the rows are read) or as stored."""

    def __init__(self, normalize: bool, target_sum: float, n_obs: int):
        self.normalize, self.target_sum, self.n_obs = normalize, target_sum, n_obs
        self.checked_to = 0
        self.flags = 0
        self.n_empty = 0

    def totals(self, lo: int, block) -> np.ndarray:
        """Row totals of a block of counts; the first time rows are read, their values are checked."""
        totals = row_totals(block)
        if lo == self.checked_to and self.checked_to < self.n_obs:
            flags = count_flags(block)
            raise_count_flags(flags & ~self.flags)  # errors at once; the non-integer warning once
            self.flags |= flags
            self.n_empty += int(np.sum(totals == 0))
            self.checked_to = lo + block.shape[0]
            if self.checked_to == self.n_obs and self.n_empty:
                logger.warning("%d cells have zero total counts; they stay all-zero after normalisation", self.n_empty)
        return totals

    def hvg_values(self, lo: int, block, base: float | None):
        """``expm1`` of the block's log1p values (:func:`~vcell.data.gene_selection.hvg_values`), from counts in one step."""
        if not self.normalize:
            return hvg_values(block, base)
        return log1p_normalize(block, self.totals(lo, block), self.target_sum, then_expm1=True)

    def log1p(self, lo: int, block, cols=None):
        """The block's log1p values (of columns ``cols`` when given)."""
        sub = block if cols is None else block[:, cols]
        if not self.normalize:
            return sub
        return log1p_normalize(sub, self.totals(lo, block), self.target_sum)


@dataclass
class Plan:
    """What :func:`plan_preprocess` decided: the cells and genes kept and the output's records."""

    normalize: bool
    target_sum: float
    n_obs: int
    keep_cells: np.ndarray | None
    cols: np.ndarray
    var_columns: dict = field(default_factory=dict)
    uns: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    rows: _Rows | None = None
    n_passes: int = 0


def _passes(source, description: str, progress: Progress):
    with progress(description, total=source.shape[0], unit="cells") as line:
        for lo, hi, (block,) in iter_blocks([source], source.bounds()):
            yield lo, block
            line.advance(hi - lo)


def plan_preprocess(source, obs: pd.DataFrame, var, uns, spec: DataSpec, *, target_sum: float = 1e4,
                    n_top_genes: int | None = 2000, subset_hvg: bool = True, genes=None, knockdown_qc: bool = False,
                    residual_expression: float = 0.30, cell_residual_expression: float | None = None, min_cells: int = 30,
                    progress: Progress = no_progress, n_passes_after: int = 0) -> Plan:
    """Run the statistics passes over ``source``'s rows and decide the cells, genes and records of the output.

    ``source`` serves the matrix (counts or log1p, as ``spec.expression`` says) in row blocks
    (:class:`~vcell.data.preprocess_stream.MemorySource` or ``H5Source``); the options are
    :func:`preprocess`'s. ``n_passes_after`` counts the passes the caller makes next (the write),
    for the progress lines.
    """
    if spec.expression is None:
        raise VcellError("expression type not set")
    if spec.expression not in EXPRESSION_TYPES:
        raise VcellError(_bad_expression(spec.expression))
    _check_columns(obs, spec)
    var = var if isinstance(var, pd.DataFrame) else pd.DataFrame(index=pd.Index(var))  # the var table, or only the gene names
    var_names = var.index
    if spec.batch_col is not None and spec.batch_col not in obs:
        raise VcellError(f"batch column '{spec.batch_col}' not found in .obs")
    normalize = spec.expression == "counts"
    target_sum = check_target_sum(target_sum) if normalize else float(target_sum)
    if normalize and "log1p" in uns:
        raise VcellError("X is already log1p-transformed (uns['log1p'] is present); expected raw counts")
    if knockdown_qc:
        check_qc_options(residual_expression, cell_residual_expression, min_cells)
    cols = gene_positions(var_names, genes) if genes is not None else None
    if genes is None and n_top_genes is not None:
        n_top_genes = check_n_top_genes(n_top_genes)
    n_obs, n_vars = source.shape
    rows = _Rows(normalize, target_sum, n_obs)
    plan = Plan(normalize, target_sum, n_obs, None, np.arange(n_vars), rows=rows)
    summary = plan.summary
    summary.update(n_cells_before=int(n_obs), n_genes_before=int(n_vars), expression_input=spec.expression,
                   normalized=False, steps=[])
    meta = _vcell_uns(uns)
    if normalize:
        plan.uns["log1p"] = {"base": None}
        meta.update(expression="log1p", target_sum=target_sum)
        summary.update(normalized=True, target_sum=target_sum)
        summary["steps"].append("normalize_log1p")
    else:
        logger.info("expression is already log1p: skipping normalisation")
        if "log1p" not in uns:
            plan.uns["log1p"] = {"base": None}
        meta["expression"] = "log1p"
    plan.uns["vcell"] = meta
    base = None if normalize else log_base(uns)

    qc = KnockdownStats(obs, var, spec.with_(expression="log1p"), "log1p", base) if knockdown_qc else None
    hvg = genes is None and n_top_genes is not None and n_top_genes < n_vars
    n_passes = plan.n_passes = int(qc is not None and qc.needs_data) + int(hvg) + n_passes_after
    done = 0

    # QC needs the target genes, which a gene subset may remove, so it runs first.
    if qc is not None:
        if qc.needs_data:
            done += 1
            for lo, block in _passes(source, f"knockdown QC (pass {done}/{n_passes})", progress):
                qc.add_columns(lo, rows.log1p(lo, block, qc.cols))
        keep, report = qc.result(residual_expression, cell_residual_expression, min_cells)
        plan.keep_cells = None if keep.all() else keep
        meta["knockdown_qc"] = qc_record(report, keep, residual_expression, cell_residual_expression, min_cells)
        dropped = report[report["status"].isin(DROP_STATUSES)]
        summary["steps"].append("knockdown_qc")
        summary["n_groups_dropped_qc"] = int(len(dropped))
        summary["n_cells_dropped_qc"] = int((~keep).sum())
        summary["perturbations_dropped_qc"] = sorted(set(dropped["perturbation"]))
        summary["n_perturbations_dropped_qc"] = len(summary["perturbations_dropped_qc"])
        summary["groups_dropped_qc"] = [
            {"context": c, "perturbation": p, "status": s}
            for c, p, s in dropped[["context", "perturbation", "status"]].itertuples(index=False)
        ]
        summary["n_targets_not_measured_qc"] = int((report["status"] == STATUS_NOT_MEASURED).sum())
        summary["n_groups_untested_qc"] = int(report["status"].isin(UNTESTED_STATUSES).sum())
        summary["knockdown_report"] = _records(report)
    kept_obs = obs if plan.keep_cells is None else obs.iloc[np.flatnonzero(plan.keep_cells)]

    if cols is not None:
        plan.cols = cols
        summary["steps"].append("subset_genes")
    elif n_top_genes is not None:
        targets = _target_genes(kept_obs[spec.pert_col], var_names, spec)
        keep_mask = pd.Index(var_names).isin(targets)
        if not hvg:
            logger.warning("n_top_genes=%d >= number of genes (%d): keeping all genes", n_top_genes, n_vars)
            plan.var_columns["highly_variable"] = np.ones(n_vars, dtype=bool)
        else:
            done += 1
            moments = GeneMoments(n_vars)
            groups = None if plan.keep_cells is None else np.where(plan.keep_cells, 0, -1)
            for lo, block in _passes(source, f"highly variable genes (pass {done}/{n_passes})", progress):
                part = None if groups is None else groups[lo : lo + block.shape[0]]
                moments.add(rows.hvg_values(lo, block, base), part)
            table = hvg_table(moments, var_names, n_top_genes)
            hv = table["highly_variable"].to_numpy(dtype=bool)
            log_selection(hv, keep_mask, len(set(targets)))
            plan.var_columns = {c: table[c].to_numpy() for c in table.columns}
            plan.uns["hvg"] = {"flavor": "seurat"}
            if subset_hvg:
                plan.cols = np.flatnonzero(hv | keep_mask)
        summary["steps"].append("select_hvg")
        summary["n_top_genes"] = int(n_top_genes)
        summary["n_target_genes_kept"] = int(pd.Index(var_names)[plan.cols].isin(targets).sum())

    summary["n_cells_after"] = int(len(kept_obs))
    summary["n_genes_after"] = int(len(plan.cols))
    labels = kept_obs[spec.pert_col].astype(str)
    summary["n_perturbations_after"] = int(labels[labels != str(spec.control)].nunique())
    logger.debug("preprocess: %d x %d -> %d x %d (cells x genes)", n_obs, n_vars, len(kept_obs), len(plan.cols))
    return plan


def _finish_annotations(out: ad.AnnData, plan: Plan) -> None:
    """Add the plan's gene columns (highly variable genes) and ``uns`` records to the subset ``out``."""
    for col, values in plan.var_columns.items():
        out.var[col] = values[plan.cols]
    for key, value in plan.uns.items():
        out.uns[key] = value


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
    if spec.expression is None:
        raise VcellError("expression type not set")
    if spec.expression not in EXPRESSION_TYPES:
        raise VcellError(_bad_expression(spec.expression))
    _require_x(adata, "preprocess")
    source = MemorySource(adata.X)
    plan = plan_preprocess(source, adata.obs, adata.var, adata.uns, spec, target_sum=target_sum,
                           n_top_genes=n_top_genes, subset_hvg=subset_hvg, genes=genes, knockdown_qc=knockdown_qc,
                           residual_expression=residual_expression, cell_residual_expression=cell_residual_expression,
                           min_cells=min_cells)
    rows = slice(None) if plan.keep_cells is None else plan.keep_cells
    out = adata[rows, plan.cols].copy()
    if plan.normalize:
        totals = plan.rows.totals(0, source.X)
        counts = out.X
        out.layers["counts"] = counts
        out.X = log1p_normalize(counts, totals[rows], plan.target_sum)
    _finish_annotations(out, plan)
    return out, plan.summary


def preprocess_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    spec: DataSpec,
    *,
    overwrite: bool = False,
    progress: Progress = no_progress,
    **options,
) -> dict:
    """Preprocess ``in_path`` into ``out_path`` (atomically), streaming the matrix in row blocks.

    Memory holds the cells' annotations and one block of rows at a time, whatever the number of
    cells: one pass over the file per statistic needed (knockdown QC, highly variable genes), then
    one that writes ``X`` (log1p) and ``layers["counts"]`` (raw counts of the genes kept) block by
    block. The output equals :func:`preprocess`'s on the same data (matrices stored as CSR).

    Parameters
    ----------
    in_path, out_path
        Input and output ``.h5ad`` files; they must differ (inputs are never modified).
    spec
        Column conventions; ``spec.expression`` must be set.
    overwrite
        Replace an existing ``out_path``.
    progress
        Factory of progress lines, called as ``progress(description, total=..., unit=...)`` and
        used as a context manager yielding an object with ``advance(n)``
        (:func:`vcell.train.display.task`); the default shows nothing.
    **options
        Keyword options of :func:`preprocess`.

    Returns
    -------
    dict
        The :func:`preprocess` summary plus ``input`` and ``output`` paths.
    """
    from vcell.data.preprocess_stream import open_input, write_preprocessed

    if spec.expression is None:
        raise VcellError("expression type not set")
    in_path, out_path = Path(in_path), Path(out_path)
    check_output_path(out_path, [in_path], overwrite=overwrite)
    with open_input(in_path) as (f, ann, source):
        plan = plan_preprocess(source, ann["obs"], ann["var"], ann.get("uns", {}), spec,
                               progress=progress, n_passes_after=1, **options)
        description = f"writing {out_path.name} (pass {plan.n_passes}/{plan.n_passes})"
        with atomic_path(out_path) as tmp:
            write_preprocessed(f, in_path, ann, source, plan, tmp, progress, _finish_annotations, description)
    logger.debug("wrote %s", out_path)
    return plan.summary | {"input": str(in_path), "output": str(out_path)}
