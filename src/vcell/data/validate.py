"""Validation of perturbation AnnData files: one clear line per problem, naming file and column.

:func:`find_problems` lists every problem it finds (``vcell data check`` prints them all);
:func:`validate` raises the first one as a :class:`~vcell.errors.VcellError`. The matrix is
scanned in row blocks, so backed files are checked without loading them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pandas as pd

from vcell.data.labels import blank_codes, factorize
from vcell.data.matrix import block_values, iter_row_chunks, locate, storage_kind
from vcell.data.spec import EXPRESSION_TYPES, SINGLE_CONTEXT, DataSpec
from vcell.errors import VcellError, did_you_mean, preview

log = logging.getLogger(__name__)

MAX_LOG1P = 30.0  # log1p of a normalised count never comes near this; larger means raw counts


@dataclass(frozen=True)
class ExpressionInfo:
    """The expression type of a matrix and how it was decided (``declared`` or ``inferred``)."""

    type: str
    how: str
    reason: str


@dataclass
class MatrixStats:
    """What a scan of the matrix found (first offending positions kept for messages)."""

    nan: tuple[int, int] | None = None
    negative: tuple[int, int, float] | None = None
    non_integer: tuple[int, int, float] | None = None
    max_value: float = 0.0
    max_pos: tuple[int, int] | None = None
    n_values: int = 0
    all_integer: bool = True
    has_fraction: bool = False


@dataclass
class Problem:
    """One validation problem; ``message`` is a complete one-line explanation."""

    kind: str
    message: str


@dataclass
class CheckReport:
    """Everything ``vcell data check`` reports about a file."""

    path: Path
    n_cells: int
    n_genes: int
    storage: str
    expression: ExpressionInfo | None
    problems: list[Problem] = field(default_factory=list)
    contexts: pd.DataFrame | None = None
    n_perturbations: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _label(path: Path | str | None) -> str:
    return str(path) if path is not None else "<AnnData>"


@numba.njit(cache=True, nogil=True)
def _scan_values(vals, frac_eps):
    """One pass: first non-finite, negative, non-integer and (frac > eps) positions; max and its position."""
    bad = neg = nonint = frac = -1
    vmax, pmax = -np.inf, -1
    for k in range(vals.size):
        v = vals[k]
        if not np.isfinite(v):
            if bad < 0:
                bad = k
            continue
        if v < 0 and neg < 0:
            neg = k
        f = v - np.floor(v)
        if f != 0:
            if nonint < 0:
                nonint = k
            if frac < 0 and f > frac_eps and v >= 0:
                frac = k
        if v > vmax:
            vmax, pmax = v, k
    return bad, neg, nonint, frac, vmax, pmax


# Fast-math without 'nnan'/'ninf': the reductions may be reordered (vectorised) but NaN and inf survive.
_REORDER = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, nogil=True, fastmath=_REORDER)
def _summarise_values(vals):
    """Branch-free pass: min, max, the float64 sum (not finite iff a value is NaN/inf), the largest fractional part."""
    vmin, vmax, total, fmax = np.inf, -np.inf, 0.0, 0.0
    for k in range(vals.size):
        v = vals[k]
        vmin = min(vmin, v)
        vmax = max(vmax, v)
        total += v
        fmax = max(fmax, v - np.floor(v))
    return vmin, vmax, total, fmax


@numba.njit(cache=True, nogil=True)
def _first_fractions(vals, frac_eps):
    """First positions of a non-integer value and of a fractional part above ``frac_eps`` (finite, >= 0 values)."""
    nonint = -1
    for k in range(vals.size):
        f = vals[k] - np.floor(vals[k])
        if f != 0:
            if nonint < 0:
                nonint = k
            if f > frac_eps:
                return nonint, k
    return nonint, -1


@numba.njit(cache=True, nogil=True)
def _first_index(vals, value):
    """Position of the first element equal to ``value`` (-1 if none); no temporary, unlike np.argmax on a map."""
    for k in range(vals.size):
        if vals[k] == value:
            return k
    return -1


def _scan_block(block, frac_eps: float):
    """Scan one block: the vectorised summary, and the exact positions only where something was found."""
    vals = np.ascontiguousarray(block_values(block)).reshape(-1)
    if vals.size == 0:
        return None
    vmin, vmax, total, fmax = _summarise_values(vals)
    if not np.isfinite(total) or vmin < 0:
        return ("full", vals.size, _scan_values(vals, frac_eps))
    nonint, frac = _first_fractions(vals, frac_eps) if fmax != 0 else (-1, -1)
    pmax = _first_index(vals, vmax)  # first occurrence, as the full scan
    return ("fast", vals.size, (-1, -1, nonint, frac, vmax, pmax))


def scan_matrix(X, chunk_rows: int = 4096, frac_eps: float = 1e-3, threads: int = 2) -> MatrixStats:
    """Scan ``X`` block by block for NaN/inf, negative and non-integer values and the maximum.

    ``has_fraction`` records whether any value has a fractional part above ``frac_eps``
    (cell-eval's test for log-normalised data). Blocks are scanned on ``threads`` threads, at
    most ``threads`` of them in memory at a time; positions reported are the first in row order.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    stats = MatrixStats()

    def merge(start: int, block, found) -> None:
        if found is None:
            return
        _, n_values, (bad, neg, nonint, frac, vmax, pmax) = found
        vals = block_values(block).reshape(-1)
        stats.n_values += n_values
        if bad >= 0 and stats.nan is None:
            r, c = locate(block, bad)
            stats.nan = (start + r, c)
        if neg >= 0 and stats.negative is None:
            r, c = locate(block, neg)
            stats.negative = (start + r, c, float(vals[neg]))
        if nonint >= 0:
            stats.all_integer = False
            if stats.non_integer is None:
                r, c = locate(block, nonint)
                stats.non_integer = (start + r, c, float(vals[nonint]))
        stats.has_fraction = stats.has_fraction or frac >= 0
        if pmax >= 0 and (vmax > stats.max_value or stats.max_pos is None):
            r, c = locate(block, pmax)
            stats.max_value, stats.max_pos = float(vmax), (start + r, c)

    chunk_rows = max(1, min(chunk_rows, -(-X.shape[0] // max(1, 4 * threads)))) if threads > 1 else chunk_rows
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for start, block in iter_row_chunks(X, chunk_rows):
            pending.append((start, block, pool.submit(_scan_block, block, frac_eps)))
            if len(pending) > threads:
                start0, block0, fut = pending.popleft()
                merge(start0, block0, fut.result())
        while pending:
            start0, block0, fut = pending.popleft()
            merge(start0, block0, fut.result())
    return stats


def recorded_expression_type(adata: ad.AnnData) -> tuple[str, str] | None:
    """Expression type recorded in the file's metadata, with where it was read, or ``None``."""
    meta = adata.uns.get("vcell", {}) if hasattr(adata.uns, "get") else {}
    recorded = meta.get("expression") if isinstance(meta, dict) else None
    if recorded is not None and str(recorded) in EXPRESSION_TYPES:
        return str(recorded), f"uns['vcell']['expression'] = {str(recorded)!r}"
    if "log1p" in adata.uns:
        return "log1p", "uns['log1p'] is present (written by scanpy.pp.log1p)"
    return None


def infer_expression_type(
    adata: ad.AnnData, declared: str | None = None, stats: MatrixStats | None = None, path=None
) -> ExpressionInfo:
    """Decide whether ``X`` holds raw counts or log1p values; never silently.

    A declared type wins. Otherwise the file's metadata (``uns['vcell']['expression']`` or
    ``uns['log1p']``) decides; failing that the values do (all integers -> counts, else log1p),
    and a log line says what was inferred and why.
    """
    if declared is not None:
        if declared not in EXPRESSION_TYPES:
            raise VcellError(f"unknown expression type {declared!r}; use one of {', '.join(EXPRESSION_TYPES)}")
        return ExpressionInfo(declared, "declared", "declared by the user")
    recorded = recorded_expression_type(adata)
    if recorded is not None:
        info = ExpressionInfo(recorded[0], "inferred", f"read from metadata: {recorded[1]}")
    else:
        stats = stats or scan_matrix(adata.X)
        if stats.all_integer:
            reason = "no expression metadata in the file and every value of X is an integer"
            info = ExpressionInfo("counts", "inferred", reason)
        else:
            reason = "no expression metadata in the file and X has non-integer values"
            info = ExpressionInfo("log1p", "inferred", reason)
    log.info(
        "%s: expression type inferred as %r (%s); pass --expression to declare it",
        _label(path),
        info.type,
        info.reason,
    )
    return info


def _column_problems(adata: ad.AnnData, spec: DataSpec, where: str) -> list[Problem]:
    problems = []
    obs = adata.obs
    for role, col in (("perturbation", spec.pert_col), ("context", spec.context_col), ("batch", spec.batch_col)):
        if col is None:
            continue
        if col not in obs.columns:
            problems.append(
                Problem(
                    "missing_column",
                    f"{where}: {role} column {col!r} not found in .obs{did_you_mean(col, obs.columns)} "
                    f"(columns: {preview(obs.columns, 12)})",
                )
            )
            continue
        codes, names = factorize(obs[col])
        empty = (codes == -1) | np.isin(codes, blank_codes(names))
        if empty.any():
            first = obs.index[int(np.argmax(empty))]
            problems.append(
                Problem(
                    "empty_group",
                    f"{where}: column {col!r} has {int(empty.sum())} cells with an empty label "
                    f"(first: cell {first!r}); every cell needs a {role}",
                )
            )
    return problems


def _control_problems(adata: ad.AnnData, spec: DataSpec, where: str) -> list[Problem]:
    obs = adata.obs
    pert_codes, perts = factorize(obs[spec.pert_col])
    if spec.control not in set(perts):
        return [
            Problem(
                "control_absent",
                f"{where}: control label {spec.control!r} not found in column {spec.pert_col!r}"
                f"{did_you_mean(spec.control, perts)} (values: {preview(perts, 6)})",
            )
        ]
    if spec.context_col is None:
        return []
    is_ctrl = pert_codes == int(np.flatnonzero(perts == spec.control)[0])
    ctx_codes, contexts = factorize(obs[spec.context_col])
    with_ctrl = np.zeros(len(contexts), dtype=bool)
    with_ctrl[np.unique(ctx_codes[is_ctrl & (ctx_codes >= 0)])] = True
    return [
        Problem(
            "control_absent_in_context",
            f"{where}: context {c!r} (column {spec.context_col!r}) has no control cells labelled "
            f"{spec.control!r}; controls are the basal input of every context (drop the context's cells, "
            "or allow it with --allow-missing-controls)",
        )
        for c in contexts[~with_ctrl]
    ]


def _gene_problems(adata: ad.AnnData, where: str) -> list[Problem]:
    names = pd.Index(adata.var_names)
    if names.is_unique:
        return []
    dup = names[names.duplicated()].unique()
    return [
        Problem(
            "duplicated_genes",
            f"{where}: {len(dup)} duplicated gene names in var_names ({preview(dup, 6)}); "
            "make them unique (e.g. AnnData.var_names_make_unique()) or aggregate them",
        )
    ]


def _value_problems(adata: ad.AnnData, stats: MatrixStats, expression: str | None, where: str) -> list[Problem]:
    def at(r: int, c: int) -> str:
        return f"cell {adata.obs_names[r]!r}, gene {adata.var_names[c]!r}"

    problems = []
    if stats.nan is not None:
        problems.append(Problem("nan", f"{where}: X contains NaN or infinite values (first at {at(*stats.nan)})"))
    if stats.negative is not None:
        r, c, v = stats.negative
        problems.append(
            Problem("negative", f"{where}: X contains negative values (first {v:g} at {at(r, c)}); expression must be >= 0")
        )
    if expression == "counts" and stats.non_integer is not None:
        r, c, v = stats.non_integer
        problems.append(
            Problem(
                "non_integer_counts",
                f"{where}: expression declared as counts but X has non-integer values (first {v:g} at {at(r, c)}); "
                "pass --expression log1p if the data is log-normalised",
            )
        )
    if expression == "log1p" and stats.max_value > MAX_LOG1P and stats.max_pos is not None:
        problems.append(
            Problem(
                "log_too_large",
                f"{where}: expression is log1p but X has values up to {stats.max_value:g} (at {at(*stats.max_pos)}), "
                f"more than {MAX_LOG1P:g}; these look like raw counts: pass --expression counts",
            )
        )
    return problems


def context_summary(adata: ad.AnnData, spec: DataSpec) -> pd.DataFrame:
    """Per context: cells, control cells, perturbed cells and number of perturbations."""
    obs = adata.obs
    pert_codes, perts = factorize(obs[spec.pert_col])
    if spec.context_col:
        ctx_codes, contexts = factorize(obs[spec.context_col])
    else:
        ctx_codes, contexts = np.zeros(len(obs), np.int32), np.array([SINGLE_CONTEXT], dtype=object)
    is_ctrl = pert_codes == (int(np.flatnonzero(perts == spec.control)[0]) if spec.control in set(perts) else -2)
    n = len(contexts)
    cells = np.bincount(ctx_codes[ctx_codes >= 0], minlength=n)
    controls = np.bincount(ctx_codes[is_ctrl & (ctx_codes >= 0)], minlength=n)
    pairs = np.unique(np.stack([ctx_codes, pert_codes])[:, ~is_ctrl & (ctx_codes >= 0) & (pert_codes >= 0)], axis=1)
    n_perts = np.bincount(pairs[0], minlength=n) if pairs.size else np.zeros(n, int)
    return pd.DataFrame(
        {"context": contexts, "cells": cells, "controls": controls, "perturbed": cells - controls, "perturbations": n_perts}
    )


def check(
    adata: ad.AnnData, spec: DataSpec, path=None, chunk_rows: int = 4096, require_context_controls: bool = True
) -> CheckReport:
    """Check ``adata`` against ``spec`` and collect a full report (summary and every problem).

    ``require_context_controls=False`` turns a context without control cells into a warning
    (its perturbed cells are then left out of splits) instead of a problem.
    """
    where = _label(path)
    report = CheckReport(
        path=Path(where),
        n_cells=adata.n_obs,
        n_genes=adata.n_vars,
        storage=storage_kind(adata.X),
        expression=None,
    )
    if adata.n_obs == 0 or adata.n_vars == 0:
        report.problems.append(Problem("empty", f"{where}: no data ({adata.n_obs} cells x {adata.n_vars} genes)"))
        return report
    report.problems += _column_problems(adata, spec, where)
    report.problems += _gene_problems(adata, where)
    columns_ok = not any(p.kind == "missing_column" for p in report.problems)
    if columns_ok:
        for problem in _control_problems(adata, spec, where):
            if problem.kind == "control_absent_in_context" and not require_context_controls:
                log.warning("%s; its perturbed cells will not be used", problem.message.split("; ")[0])
            else:
                report.problems.append(problem)
        report.contexts = context_summary(adata, spec)
        _, perts = factorize(adata.obs[spec.pert_col])
        report.n_perturbations = int(np.sum(perts != spec.control))
    stats = scan_matrix(adata.X, chunk_rows)
    report.expression = infer_expression_type(adata, spec.expression, stats, path)
    report.problems += _value_problems(adata, stats, report.expression.type, where)
    return report


def validate(adata: ad.AnnData, spec: DataSpec, path=None, require_context_controls: bool = True) -> ExpressionInfo:
    """Raise a one-line :class:`VcellError` for the first problem; return the expression type."""
    report = check(adata, spec, path, require_context_controls=require_context_controls)
    if report.problems:
        extra = f" (and {len(report.problems) - 1} more problem(s); run `vcell data check`)" if len(report.problems) > 1 else ""
        raise VcellError(report.problems[0].message + extra)
    assert report.expression is not None
    return report.expression
