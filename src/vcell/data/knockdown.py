"""Knockdown QC: drop perturbations whose target gene is not knocked down.

The rule is cell-load's ``filter_on_target_knockdown`` (a perturbation-level ratio, an optional
cell-level ratio, then a minimum of cells) with these differences, each deliberate: controls,
ratios and cell counts are taken per context (cell-load pools every control of the file); the
ratio is of depth-normalised expression (cell-load compares X as stored); a combination ``A+B``
is tested on each measured target (cell-load drops it: the label is no gene); a ratio equal to a
threshold passes (cell-load's code wants it strictly below); the cell-level ratio is off unless
given (cell-load's default is 0.5); and a group that cannot be tested (no target among the genes,
no control expression, no controls in its context) is kept, reported and warned of (cell-load
drops it). Genes are looked up in var_names (cell-load reads ``var['gene_name']``).

:class:`KnockdownStats` collects what the QC needs from row blocks of the matrix (the control
mean of every target gene per context, and each perturbed cell's value of its own targets), so
a file streamed in blocks and a matrix in memory (one block) give the same report.
:func:`knockdown_qc` runs it on an :class:`~anndata.AnnData` and returns a new object plus the
report; the input is never modified in place.
"""

from __future__ import annotations

import logging
import math

import anndata as ad
import numba
import numpy as np
import pandas as pd
from scipy import sparse

from vcell.data.labels import gene_name_column
from vcell.data.normalize import _csr_totals, _require_x, _vcell_uns
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
STATUS_NO_CONTROLS = "no_controls"
DROP_STATUSES = (STATUS_NOT_KNOCKED_DOWN, STATUS_TOO_FEW_CELLS)
#: Statuses of groups kept because they could not be tested, and why (in the warning).
UNTESTED_REASONS = {STATUS_NOT_MEASURED: "no target among the genes", STATUS_NO_CONTROL_EXPR: "no control expression of the target",
                    STATUS_NO_CONTROLS: "no control cells in the context"}
UNTESTED_STATUSES = tuple(UNTESTED_REASONS)

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


def _check_columns(adata_or_obs, spec: DataSpec) -> None:
    obs = adata_or_obs.obs if isinstance(adata_or_obs, ad.AnnData) else adata_or_obs
    for role, col in (("perturbation", spec.pert_col), ("context", spec.context_col)):
        if col is None:
            continue
        if col not in obs:
            raise VcellError(f"{role} column '{col}' not found in .obs")
        n_na = int(obs[col].isna().sum())
        if n_na:
            raise VcellError(f"{role} column '{col}' has {n_na} missing values")


def _labels(obs: pd.DataFrame, col: str | None) -> np.ndarray:
    if col is None:
        return np.full(len(obs), SINGLE_CONTEXT, dtype=object)
    return obs[col].astype(str).to_numpy(dtype=object)


def check_qc_options(residual_expression: float, cell_residual_expression: float | None, min_cells: int) -> None:
    """One-line errors for knockdown-QC thresholds out of range."""
    if not (0 <= residual_expression):
        raise VcellError(f"residual_expression must be >= 0, got {residual_expression}")
    if cell_residual_expression is not None and not (0 <= cell_residual_expression):
        raise VcellError(f"cell_residual_expression must be >= 0, got {cell_residual_expression}")
    if min_cells < 0:
        raise VcellError(f"min_cells must be >= 0, got {min_cells}")


@numba.njit(cache=True, nogil=True)
def _accumulate(indptr, indices, data, start, ctrl_ctx, slots, ctrl_sums, cell_vals):
    n_slots = slots.shape[1]
    for r in range(indptr.size - 1):
        cell = start + r
        ctx = ctrl_ctx[cell]
        if ctx >= 0:
            for j in range(indptr[r], indptr[r + 1]):
                ctrl_sums[ctx, indices[j]] += data[j]
        elif n_slots and slots[cell, 0] >= 0:
            for j in range(indptr[r], indptr[r + 1]):
                c = indices[j]
                for k in range(n_slots):
                    if slots[cell, k] == c:
                        cell_vals[cell, k] = data[j]


class KnockdownStats:
    """What knockdown QC needs from the matrix, added up over row blocks (in row order).

    Parameters
    ----------
    obs
        The cells' annotations (all cells of the matrix, in row order).
    var
        The genes (columns of the matrix): the var DataFrame; its index names them, and a column
        that names targets var_names lack is pointed to in the warning.
    spec
        Column conventions.
    expression
        ``"log1p"`` (values are expm1-ed, with ``log_base``) or ``"counts"`` (scaled to 10,000 per cell).
    log_base
        Base of the log1p values (``None``: natural log).
    """

    def __init__(self, obs: pd.DataFrame, var: pd.DataFrame, spec: DataSpec, expression: str, log_base: float | None = None):
        if expression not in EXPRESSION_TYPES:
            raise VcellError(_bad_expression(expression))
        _check_columns(obs, spec)
        self.expression, self.log_base = expression, log_base
        self.perts, self.contexts = _labels(obs, spec.pert_col), _labels(obs, spec.context_col)
        self.control = str(spec.control)
        is_control = self.perts == self.control
        if not is_control.any():
            raise VcellError(f"control label '{self.control}' not found in column '{spec.pert_col}'")
        # contexts without controls (--allow-missing-controls) have their groups kept untested
        self.no_controls = set(self.contexts[~is_control]) - set(self.contexts[is_control])
        self.var = var
        self.gene_pos: dict[str, int] = {}
        for i, g in enumerate(var.index):
            self.gene_pos.setdefault(str(g), i)  # first occurrence if names repeat

        self.groups = pd.DataFrame({"context": self.contexts, "perturbation": self.perts}).groupby(
            ["context", "perturbation"], sort=True).indices
        ctx_names, ctx_codes = np.unique(self.contexts.astype(str), return_inverse=True)
        self.ctx_index = {c: i for i, c in enumerate(ctx_names)}
        self.n_ctrl = np.bincount(ctx_codes[is_control], minlength=len(ctx_names))
        self.ctrl_ctx = np.where(is_control, ctx_codes, -1).astype(np.int64)

        measured = {}  # label -> its measured targets, in label order
        for lab in pd.unique(self.perts):
            if lab != self.control:
                measured[lab] = [t for t in dict.fromkeys(split_combo(lab)) if t in self.gene_pos]
        self.measured = measured
        self.targets = list(dict.fromkeys(t for ts in measured.values() for t in ts))
        self.local = {t: i for i, t in enumerate(self.targets)}
        self.cols = np.array([self.gene_pos[t] for t in self.targets], dtype=np.int64)
        width = max((len(ts) for ts in measured.values()), default=0)
        codes, uniques = pd.factorize(self.perts)
        table = np.full((len(uniques), width), -1, dtype=np.int64)
        for u, lab in enumerate(uniques):
            for k, t in enumerate(measured.get(lab, [])):
                table[u, k] = self.local[t]
        self.slots = table[codes] if len(uniques) else np.full((len(obs), width), -1, dtype=np.int64)
        self.ctrl_sums = np.zeros((len(ctx_names), len(self.targets)), dtype=np.float64)
        self.cell_vals = np.zeros((len(obs), width), dtype=np.float64)

    @property
    def needs_data(self) -> bool:
        """Whether any target gene is measured (otherwise the matrix need not be read)."""
        return len(self.targets) > 0

    def add(self, start: int, block) -> None:
        """Add rows ``start, start + 1, ...`` given as ``block``: full rows of the matrix (CSR or dense)."""
        if not self.needs_data:
            return
        if sparse.issparse(block):
            block = block if block.format == "csr" else block.tocsr()
        totals = None
        if self.expression == "counts":
            if sparse.issparse(block):
                totals = np.zeros(block.shape[0], dtype=np.float64)
                _csr_totals(block.indptr, block.data, totals)
            else:
                totals = np.sum(np.asarray(block), axis=1, dtype=np.float64)
        self.add_columns(start, block[:, self.cols], totals)

    def add_columns(self, start: int, sub, totals: np.ndarray | None = None) -> None:
        """:meth:`add` given only the target columns (``sub``: rows x :attr:`cols`), and for counts the full rows' totals."""
        if not self.needs_data:
            return
        sub = sparse.csr_matrix(sub, dtype=np.float64, copy=True)
        vals = sub.data
        if self.expression == "log1p":
            if self.log_base is not None:
                vals *= math.log(self.log_base)
            np.expm1(vals, out=vals)
        else:
            with np.errstate(divide="ignore"):
                scale = np.where(totals > 0, _QC_TARGET_SUM / totals, 0.0)
            vals *= np.repeat(scale, np.diff(sub.indptr))
        _accumulate(sub.indptr, sub.indices, vals, int(start), self.ctrl_ctx, self.slots, self.ctrl_sums, self.cell_vals)

    def result(self, residual_expression: float = 0.30, cell_residual_expression: float | None = None,
               min_cells: int = 30) -> tuple[np.ndarray, pd.DataFrame]:
        """The cells kept (bool mask) and the report, once every row was added (see :func:`knockdown_qc`)."""
        keep_cells = np.ones(len(self.perts), dtype=bool)
        rows: list[dict] = []
        for (ctx, pert), idx in self.groups.items():
            idx = np.asarray(idx)
            row = dict(context=ctx, perturbation=pert, n_cells=len(idx), n_cells_kept=len(idx),
                       target_gene=None, control_mean=np.nan, pert_mean=np.nan, ratio=np.nan)
            if pert == self.control:
                rows.append(row | {"status": STATUS_CONTROL})
                continue
            measured = self.measured[pert]
            if ctx in self.no_controls:
                rows.append(row | {"target_gene": "+".join(measured) or None, "status": STATUS_NO_CONTROLS})
                continue
            if not measured:
                targets = list(dict.fromkeys(split_combo(pert)))
                rows.append(row | {"target_gene": "+".join(targets), "status": STATUS_NOT_MEASURED})
                continue
            c = self.ctx_index[ctx]
            ctrl = {t: float(self.ctrl_sums[c, self.local[t]] / self.n_ctrl[c]) for t in measured}
            values = self.cell_vals[idx, : len(measured)]
            pmeans = dict(zip(measured, values.mean(axis=0).tolist(), strict=True))
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
                k = [measured.index(t) for t in testable]
                thresholds = cell_residual_expression * np.array([ctrl[t] for t in testable])
                cell_ok = np.all(values[:, k] <= thresholds[None, :], axis=1)
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
        logger.info("knockdown QC: %d of %d perturbation groups dropped, %d of %d cells removed", n_dropped,
                    int((report["status"] != STATUS_CONTROL).sum()), int((~keep_cells).sum()), len(keep_cells))
        self._warn_untested(report)
        _warn_raised(report)
        return keep_cells, report

    def _warn_untested(self, report: pd.DataFrame) -> None:
        """One warning line on the groups kept without a test, by reason (a QC that tests nothing is no QC)."""
        perts = report[report["status"] != STATUS_CONTROL]
        parts, n_untested = [], 0
        for status, reason in UNTESTED_REASONS.items():
            rows = perts[perts["status"] == status]
            if len(rows):
                first = rows.iloc[0]
                parts.append(f"{len(rows)} with {reason} (e.g. {first['perturbation']!r} in {first['context']!r})")
                n_untested += len(rows)
        if not parts:
            return
        hint = ""
        unmeasured = perts.loc[perts["status"] == STATUS_NOT_MEASURED, "perturbation"]
        if len(unmeasured):
            targets = {t for lab in unmeasured for t in split_combo(lab)}
            if found := gene_name_column(self.var, targets):
                col, hits = found
                hint = (f"; var[{col!r}] names {len(hits)} of their targets (e.g. {sorted(hits)[0]!r}), var_names do not: "
                        f"make var[{col!r}] the var_names to test them")
        logger.warning("knockdown QC kept %d of %d perturbation groups untested: %s%s", n_untested, len(perts), "; ".join(parts), hint)


#: A target this many times its controls' level is raised, not knocked down: :func:`_warn_raised`.
RAISED_RATIO = 2.0


def _warn_raised(report: pd.DataFrame) -> None:
    """One warning on targets well above the controls' level: activation (CRISPRa) or overexpression
    data, whose perturbations knockdown QC drops as not knocked down."""
    raised = report[report["ratio"] >= RAISED_RATIO].sort_values("ratio", ascending=False)
    if len(raised):
        top = raised.iloc[0]
        dropped = int((raised["status"] == STATUS_NOT_KNOCKED_DOWN).sum())
        logger.warning("knockdown QC: %d tested perturbation group(s) have their target at %gx or more of the controls' level "
                       "(e.g. %r in %r: %.3gx), %d of them dropped as not knocked down; is this activation or overexpression "
                       "data? The QC is for knockdowns and knockouts", len(raised), RAISED_RATIO, top["perturbation"],
                       top["context"], top["ratio"], dropped)


def qc_record(report: pd.DataFrame, keep_cells: np.ndarray, residual_expression: float,
              cell_residual_expression: float | None, min_cells: int) -> dict:
    """The ``uns["vcell"]["knockdown_qc"]`` record of a QC run."""
    rec = {"residual_expression": float(residual_expression), "min_cells": int(min_cells),
           "n_groups_dropped": int(report["status"].isin(DROP_STATUSES).sum()),
           "n_groups_untested": int(report["status"].isin(UNTESTED_STATUSES).sum()),
           "n_cells_dropped": int((~keep_cells).sum())}
    if cell_residual_expression is not None:
        rec["cell_residual_expression"] = float(cell_residual_expression)
    return rec


def knockdown_qc(
    adata: ad.AnnData,
    spec: DataSpec,
    residual_expression: float = 0.30,
    cell_residual_expression: float | None = None,
    min_cells: int = 30,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Drop perturbations whose target gene is not knocked down (cell-load's rule per context; see the module).

    For every (context, perturbation) the mean normalised expression of each target gene in the
    perturbed cells is compared with the control cells of the same context. Groups with
    ``pert_mean / control_mean > residual_expression`` for any target are dropped. With
    ``cell_residual_expression``, perturbed cells whose target expression exceeds
    ``cell_residual_expression * control_mean`` are dropped too; groups that passed the mean test
    but have fewer than ``min_cells`` cells left are then dropped. Controls are never dropped;
    groups whose targets are unmeasured, or have no control expression or no controls in their
    context, are reported, warned of and kept.

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
        ``no_control_expression``, ``no_controls``).
    """
    _require_x(adata, "knockdown_qc")
    if spec.expression is None:
        raise VcellError("expression type not set")
    if spec.expression not in EXPRESSION_TYPES:
        raise VcellError(_bad_expression(spec.expression))
    check_qc_options(residual_expression, cell_residual_expression, min_cells)
    base = (adata.uns.get("log1p") or {}).get("base") if spec.expression == "log1p" else None
    stats = KnockdownStats(adata.obs, adata.var, spec, spec.expression, None if base is None else float(base))
    stats.add(0, adata.X)
    keep_cells, report = stats.result(residual_expression, cell_residual_expression, min_cells)
    out = adata[keep_cells].copy()
    meta = _vcell_uns(out)
    meta["knockdown_qc"] = qc_record(report, keep_cells, residual_expression, cell_residual_expression, min_cells)
    out.uns["vcell"] = meta
    return out, report
