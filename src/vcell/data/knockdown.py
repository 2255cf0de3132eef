"""Knockdown QC: drop perturbations whose target gene is not knocked down (cell-load / arc-state style).

:func:`knockdown_qc` takes an :class:`~anndata.AnnData` and returns a new object plus a report;
the input is never modified in place.
"""

from __future__ import annotations

import logging
import math

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from vcell.data.normalize import _require_x, _vcell_uns
from vcell.data.spec import EXPRESSION_TYPES, SINGLE_CONTEXT, DataSpec, split_combo
from vcell.errors import VcellError

# One logger for the whole preprocessing pipeline (`vcell data preprocess`), whichever module logs.
logger = logging.getLogger("vcell.data.preprocess")

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

