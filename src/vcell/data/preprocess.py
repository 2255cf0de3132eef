"""Preprocessing of single-cell perturbation AnnData: normalisation, gene selection, knockdown QC.

Every function takes an :class:`~anndata.AnnData` plus keyword options and returns a new object;
the input is never modified in place.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

from vcell.data.io import check_output_path, read_h5ad, write_h5ad
from vcell.data.spec import EXPRESSION_TYPES, SINGLE_CONTEXT, DataSpec, split_combo
from vcell.errors import VcellError

logger = logging.getLogger(__name__)

#: Knockdown-QC statuses; only ``DROP_STATUSES`` remove cells.
STATUS_CONTROL = "control"
STATUS_KEPT = "kept"
STATUS_NOT_KNOCKED_DOWN = "not_knocked_down"
STATUS_TOO_FEW_CELLS = "too_few_cells"
STATUS_NOT_MEASURED = "target_not_measured"
STATUS_NO_CONTROL_EXPR = "no_control_expression"
DROP_STATUSES = (STATUS_NOT_KNOCKED_DOWN, STATUS_TOO_FEW_CELLS)

REPORT_COLUMNS = [
    "context",
    "perturbation",
    "n_cells",
    "n_cells_kept",
    "target_gene",
    "control_mean",
    "pert_mean",
    "ratio",
    "status",
]

# Scale of "normalised counts" when knockdown QC runs on raw counts; ratios do not depend on it.
_QC_TARGET_SUM = 1e4


def _vcell_uns(adata: ad.AnnData) -> dict:
    """A fresh copy of ``uns["vcell"]`` (so edits never reach a shared dict)."""
    return dict(adata.uns.get("vcell", {}) or {})


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

    sc.pp.highly_variable_genes(
        out, n_top_genes=int(n_top_genes), flavor="seurat", batch_key=batch_key, subset=False
    )
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
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        msg = f"{source}: {len(missing)} of {len(unique)} genes not found in the data: {shown}"
        if not allow_missing:
            raise VcellError(msg)
        logger.warning("%s; keeping the %d present", msg, len(unique) - len(missing))
    present = [g for g in unique if g in present_set]
    if not present:
        raise VcellError(f"{source}: none of the {len(unique)} genes are in the data")
    return adata[:, present].copy()


def _bad_expression(value) -> str:
    return f"unknown expression type '{value}' (expected one of {', '.join(EXPRESSION_TYPES)})"


def _check_columns(adata: ad.AnnData, spec: DataSpec) -> None:
    for role, col in (("perturbation", spec.pert_col), ("context", spec.context_col)):
        if col is None:
            continue
        if col not in adata.obs:
            raise VcellError(f"{role} column '{col}' not found in .obs")
        n_na = int(adata.obs[col].isna().sum())
        if n_na:
            raise VcellError(f"{role} column '{col}' has {n_na} missing values")


def _labels(adata: ad.AnnData, col: str | None) -> np.ndarray:
    if col is None:
        return np.full(adata.n_obs, SINGLE_CONTEXT, dtype=object)
    return adata.obs[col].astype(str).to_numpy(dtype=object)


class _TargetExpression:
    """Normalised expression of selected genes for selected cells (expm1 of log1p, or CP10k)."""

    def __init__(self, adata: ad.AnnData, expression: str):
        x = adata.X
        self.x = x.tocsr() if sparse.issparse(x) and x.format != "csr" else x
        self.expression = expression
        self.scale = None
        base = (adata.uns.get("log1p") or {}).get("base") if expression == "log1p" else None
        self.log_base = None if base is None else float(base)
        if expression == "counts":
            totals = np.asarray(self.x.sum(axis=1), dtype=np.float64).ravel()
            with np.errstate(divide="ignore"):
                self.scale = np.where(totals > 0, _QC_TARGET_SUM / totals, 0.0)

    def matrix(self, rows: np.ndarray, cols: np.ndarray):
        """Normalised expression, cells ``rows`` x genes ``cols`` (sparse stays sparse)."""
        sub = self.x[rows][:, cols]
        if sparse.issparse(sub):
            sub = sparse.csr_matrix(sub, dtype=np.float64, copy=True)
            vals = sub.data
        else:
            sub = np.asarray(sub, dtype=np.float64).copy()
            vals = sub
        if self.expression == "log1p":
            if self.log_base is not None:
                vals *= math.log(self.log_base)
            np.expm1(vals, out=vals)
            return sub
        if sparse.issparse(sub):
            return sparse.diags(self.scale[rows]) @ sub
        return sub * self.scale[rows][:, None]

    def mean(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.full(len(cols), np.nan)
        return np.asarray(self.matrix(rows, cols).mean(axis=0), dtype=np.float64).ravel()

    def dense(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        m = self.matrix(rows, cols)
        return m.toarray() if sparse.issparse(m) else np.asarray(m)


def knockdown_qc(
    adata: ad.AnnData,
    spec: DataSpec,
    residual_expression: float = 0.30,
    cell_residual_expression: float | None = None,
    min_cells: int = 30,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Drop perturbations whose target gene is not knocked down (cell-load / arc-state style).

    For every (context, perturbation) the mean normalised expression of each target gene in the
    perturbed cells is compared with the control cells of the same context. Groups with
    ``pert_mean / control_mean > residual_expression`` for any target are dropped. With
    ``cell_residual_expression``, perturbed cells whose target expression exceeds
    ``cell_residual_expression * control_mean`` are dropped too; groups that passed the mean test
    but have fewer than ``min_cells`` cells left are then dropped. Controls are never dropped;
    groups whose targets are unmeasured, or have no control expression, are reported and kept.

    Parameters
    ----------
    adata
        Cells x genes, all genes (targets must be in ``var_names``).
    spec
        Column conventions; ``spec.expression`` says whether ``X`` holds counts or log1p.
    residual_expression
        Highest allowed ratio of perturbed to control mean expression.
    cell_residual_expression
        Optional per-cell ceiling, as a fraction of the control mean.
    min_cells
        Fewest cells a tested perturbation must keep (per context).

    Returns
    -------
    AnnData
        A new object without the dropped cells.
    DataFrame
        One row per (context, perturbation), controls included, with columns ``context``,
        ``perturbation``, ``n_cells``, ``n_cells_kept``, ``target_gene`` (for combinations the
        target with the highest ratio), ``control_mean``, ``pert_mean``, ``ratio``, ``status``
        (``control``, ``kept``, ``not_knocked_down``, ``too_few_cells``, ``target_not_measured``,
        ``no_control_expression``).
    """
    _require_x(adata, "knockdown_qc")
    if spec.expression is None:
        raise VcellError("expression type not set")
    if spec.expression not in EXPRESSION_TYPES:
        raise VcellError(_bad_expression(spec.expression))
    if not (0 <= residual_expression):
        raise VcellError(f"residual_expression must be >= 0, got {residual_expression}")
    if cell_residual_expression is not None and not (0 <= cell_residual_expression):
        raise VcellError(f"cell_residual_expression must be >= 0, got {cell_residual_expression}")
    if min_cells < 0:
        raise VcellError(f"min_cells must be >= 0, got {min_cells}")
    _check_columns(adata, spec)

    perts = _labels(adata, spec.pert_col)
    contexts = _labels(adata, spec.context_col)
    control = str(spec.control)
    is_control = perts == control
    if not is_control.any():
        raise VcellError(f"control label '{control}' not found in column '{spec.pert_col}'")

    no_ctrl = sorted(set(contexts[~is_control]) - set(contexts[is_control]))
    if no_ctrl:
        more = f" (and {len(no_ctrl) - 1} more)" if len(no_ctrl) > 1 else ""
        raise VcellError(
            f"no control cells ('{control}' in column '{spec.pert_col}') in context "
            f"'{no_ctrl[0]}'{more} of column '{spec.context_col}'"
        )

    gene_pos: dict[str, int] = {}
    for i, g in enumerate(adata.var_names):
        gene_pos.setdefault(str(g), i)  # first occurrence if names repeat

    expr = _TargetExpression(adata, spec.expression)
    groups = pd.DataFrame({"context": contexts, "perturbation": perts}).groupby(
        ["context", "perturbation"], sort=True
    ).indices
    keep_cells = np.ones(adata.n_obs, dtype=bool)
    rows: list[dict] = []
    control_cache: dict[str, tuple[np.ndarray, dict[str, float]]] = {}

    def control_means(ctx: str, genes: list[str]) -> dict[str, float]:
        if ctx not in control_cache:
            ctrl_rows = np.flatnonzero(is_control & (contexts == ctx))
            control_cache[ctx] = (ctrl_rows, {})
        ctrl_rows, cache = control_cache[ctx]
        todo = [g for g in genes if g not in cache]
        if todo:
            means = expr.mean(ctrl_rows, np.array([gene_pos[g] for g in todo]))
            cache.update(zip(todo, means.tolist(), strict=True))
        return {g: cache[g] for g in genes}

    for (ctx, pert), idx in groups.items():
        idx = np.asarray(idx)
        row = dict(context=ctx, perturbation=pert, n_cells=len(idx), n_cells_kept=len(idx),
                   target_gene=None, control_mean=np.nan, pert_mean=np.nan, ratio=np.nan)
        if pert == control:
            rows.append(row | {"status": STATUS_CONTROL})
            continue
        targets = list(dict.fromkeys(split_combo(pert)))
        measured = [t for t in targets if t in gene_pos]
        if not measured:
            rows.append(row | {"target_gene": "+".join(targets), "status": STATUS_NOT_MEASURED})
            continue
        ctrl = control_means(ctx, measured)
        cols = np.array([gene_pos[t] for t in measured])
        pmeans = dict(zip(measured, expr.mean(idx, cols).tolist(), strict=True))
        testable = [t for t in measured if ctrl[t] > 0]
        if not testable:
            t = measured[0]
            rows.append(row | {"target_gene": t, "control_mean": ctrl[t], "pert_mean": pmeans[t],
                               "status": STATUS_NO_CONTROL_EXPR})
            continue
        ratios = {t: pmeans[t] / ctrl[t] for t in testable}
        worst = max(testable, key=lambda t: ratios[t])
        row |= {"target_gene": worst, "control_mean": ctrl[worst], "pert_mean": pmeans[worst],
                "ratio": ratios[worst]}
        if ratios[worst] > residual_expression:
            keep_cells[idx] = False
            rows.append(row | {"n_cells_kept": 0, "status": STATUS_NOT_KNOCKED_DOWN})
            continue
        kept_idx = idx
        if cell_residual_expression is not None:
            tcols = np.array([gene_pos[t] for t in testable])
            thresholds = cell_residual_expression * np.array([ctrl[t] for t in testable])
            cell_ok = np.all(expr.dense(idx, tcols) <= thresholds[None, :], axis=1)
            keep_cells[idx[~cell_ok]] = False
            kept_idx = idx[cell_ok]
        if len(kept_idx) < min_cells:
            keep_cells[idx] = False
            rows.append(row | {"n_cells_kept": 0, "status": STATUS_TOO_FEW_CELLS})
            continue
        rows.append(row | {"n_cells_kept": len(kept_idx), "status": STATUS_KEPT})

    report = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    report["n_cells"] = report["n_cells"].astype(int)
    report["n_cells_kept"] = report["n_cells_kept"].astype(int)
    for col in ("control_mean", "pert_mean", "ratio"):
        report[col] = report[col].astype(float)

    n_dropped = int(report["status"].isin(DROP_STATUSES).sum())
    logger.info(
        "knockdown QC: %d of %d perturbation groups dropped, %d of %d cells removed; "
        "%d groups with unmeasured targets kept",
        n_dropped, int((report["status"] != STATUS_CONTROL).sum()),
        int((~keep_cells).sum()), adata.n_obs, int((report["status"] == STATUS_NOT_MEASURED).sum()),
    )
    out = adata[keep_cells].copy()
    meta = _vcell_uns(out)
    qc_meta = {"residual_expression": float(residual_expression), "min_cells": int(min_cells),
               "n_groups_dropped": n_dropped, "n_cells_dropped": int((~keep_cells).sum())}
    if cell_residual_expression is not None:
        qc_meta["cell_residual_expression"] = float(cell_residual_expression)
    meta["knockdown_qc"] = qc_meta
    out.uns["vcell"] = meta
    return out, report


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
