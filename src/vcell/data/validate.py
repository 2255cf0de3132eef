"""Validation of perturbation AnnData files: one clear line per problem, naming file and column.

:func:`check` lists every problem it finds (``vcell data check`` prints them all);
:func:`validate` raises the first one as a :class:`~vcell.errors.VcellError`. The matrix is
scanned in row blocks (:func:`~vcell.data.matrix.scan_matrix`), so backed files are checked
without loading them.

The expression values follow one set of rules wherever they are read
(:func:`expression_problems`): commands that need the whole data set checked go through
:func:`validate`, those that only read the matrix (``vcell embed``, ``vcell train se``,
``vcell genes from-data``, ``vcell eval``) through :func:`check_expression`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from vcell.data.labels import blank_codes, factorize
from vcell.data.matrix import MatrixStats, scan_matrix, scan_values, storage_kind  # noqa: F401 (re-exported)
from vcell.data.spec import EXPRESSION_TYPES, SINGLE_CONTEXT, DataSpec, column_guess
from vcell.errors import VcellError, control_hint, preview

log = logging.getLogger(__name__)
# settings vcell decided for the user (the expression type): `vcell -v` shows them, each once
inferred_log = logging.getLogger("vcell.inferred")

MAX_LOG1P = 30.0  # log1p of a normalised count never comes near this; larger means raw counts
CELL_EVAL_MAX_LOG1P = 15.0  # cell-eval rejects log1p data reaching this (``cell_eval=True`` rules)
FRACTION_EPS = 1e-3  # a value is fractional when its fractional part exceeds this (cell-eval's test)


@dataclass(frozen=True)
class ExpressionInfo:
    """The expression type of a matrix and how it was decided (``declared`` or ``inferred``)."""

    type: str
    how: str
    reason: str


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
    n_perturbations: int | None = None  # None: the perturbation column is missing

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _label(path: Path | str | None) -> str:
    return str(path) if path is not None else "<AnnData>"


_FROM_METADATA = "read from metadata: "


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
    adata: ad.AnnData,
    declared: str | None = None,
    stats: MatrixStats | None = None,
    path=None,
    cell_eval: bool = False,
) -> ExpressionInfo:
    """Decide whether ``X`` holds raw counts or log1p values; never silently.

    A declared type wins. Otherwise the file's metadata (``uns['vcell']['expression']`` or
    ``uns['log1p']``) decides; failing that the values do (all integers -> counts, else log1p).
    ``cell_eval=True`` decides from the values alone, as cell-eval does (a value whose fractional
    part exceeds 1e-3 means log1p). What was inferred and why is logged at INFO on the
    ``vcell.inferred`` logger (the command line shows it with ``-v``, once per file).
    """
    if declared is not None:
        if declared not in EXPRESSION_TYPES:
            raise VcellError(f"unknown expression type {declared!r}; use one of {', '.join(EXPRESSION_TYPES)}")
        return ExpressionInfo(declared, "declared", "declared by the user")
    recorded = None if cell_eval else recorded_expression_type(adata)
    if recorded is not None:
        info = ExpressionInfo(recorded[0], "inferred", f"{_FROM_METADATA}{recorded[1]}")
    else:
        stats = stats or scan_matrix(adata.X)
        fractional = stats.has_fraction if cell_eval else not stats.all_integer
        if not fractional:
            reason = "every value of X is an integer"
            info = ExpressionInfo("counts", "inferred", reason if cell_eval else f"no expression metadata in the file and {reason}")
        else:
            reason = f"X has non-integer values, max {stats.max_value:g}" if cell_eval else "no expression metadata in the file and X has non-integer values"
            info = ExpressionInfo("log1p", "inferred", reason)
    inferred_log.info("%s: expression type inferred as %r (%s); pass --expression to declare it", _label(path), info.type, info.reason)
    return info


def expression_problems(
    adata: ad.AnnData,
    stats: MatrixStats,
    info: ExpressionInfo,
    where: str,
    option: str = "--expression",
    cell_eval: bool = False,
) -> list[Problem]:
    """The problems of ``X``'s values, given its expression type ``info``: the one set of rules every
    command that reads expression applies (through :func:`check` or :func:`check_expression`).

    NaN/inf and negative values; counts that are not integers; a declared log1p whose values are all
    integers (raw counts); log1p values above :data:`MAX_LOG1P` (15 with ``cell_eval``, as
    cell-eval). Each message names the file and the first offending cell and gene; ``option``
    is the option that declares the type, as the user spells it.
    """

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
    if problems:
        return problems  # the type rules below mean nothing on such values
    fractional = stats.has_fraction if cell_eval else not stats.all_integer
    limit = CELL_EVAL_MAX_LOG1P if cell_eval else MAX_LOG1P
    top = stats.max_value
    over = top >= limit if cell_eval else top > limit
    if info.type == "counts" and fractional and stats.non_integer is not None:
        r, c, v = stats.non_integer
        said = f"{option} counts" if info.how == "declared" else f"expression counts ({info.reason})"
        problems.append(
            Problem(
                "non_integer_counts",
                f"{where}: {said} but X has non-integer values (first {v:g} at {at(r, c)}): the expression was "
                f"declared as counts; pass {option} log1p if the data is log-normalised",
            )
        )
    elif (info.type == "log1p" and (info.how == "declared" or info.reason.startswith(_FROM_METADATA)) and not fractional
          and top >= 1 and stats.max_pos is not None):
        # log1p of normalised counts is never an integer: a claim (the user's, or the file's own metadata) of log1p
        # on all-integer values is raw counts
        beyond = f"; more than {limit:g}, too large if the expression is log1p" if over else ""
        said = f"{option} log1p" if info.how == "declared" else f"the file's metadata says log1p ({info.reason[len(_FROM_METADATA):]})"
        problems.append(
            Problem(
                "log_too_large" if beyond else "integer_log1p",
                f"{where}: {said} but every value is an integer (max {top:g} at {at(*stats.max_pos)}{beyond}): "
                f"these look like raw counts; pass {option} counts",
            )
        )
    elif info.type == "log1p" and over and stats.max_pos is not None:
        said = "expression is log1p" + ("" if info.how == "declared" else f" ({info.reason})")
        problems.append(
            Problem(
                "log_too_large",
                f"{where}: {said} but X has values up to {top:g} (at {at(*stats.max_pos)}), more than {limit:g}: out of "
                f"the log1p range (raw counts, or another scale); give log1p(normalised counts), or pass {option} counts",
            )
        )
    return problems


def check_expression(
    adata: ad.AnnData, declared: str | None = None, path=None, option: str = "--expression", cell_eval: bool = False
) -> ExpressionInfo:
    """Scan ``X`` once, decide its expression type and raise a one-line :class:`VcellError` naming the
    file (and the first bad cell and gene) for its first value problem (:func:`expression_problems`).

    Every command that reads expression calls this (or :func:`validate`, which applies the same rules)
    before it computes anything: NaN, negative or mislabelled values never reach a model or a file.
    """
    stats = scan_matrix(adata.X, frac_eps=FRACTION_EPS)
    info = infer_expression_type(adata, declared, stats, path, cell_eval=cell_eval)
    problems = expression_problems(adata, stats, info, _label(path), option, cell_eval)
    if problems:
        raise VcellError(problems[0].message)
    return info


_ONE_CONTEXT = "; a file of one context: --context-col none (context_col=None)"


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
                    f"{where}: {role} column {col!r} not found in .obs{column_guess(col, obs.columns, role)} "
                    f"(columns: {preview(obs.columns, 12)})" + (_ONE_CONTEXT if role == "context" else ""),
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
                f"{control_hint(spec.control, perts)} (values: {preview(perts, 6)})",
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
            "or allow it with --allow-missing-controls (require_context_controls=False))",
        )
        for c in contexts[~with_ctrl]
    ]


def check_unique_genes(genes, where: str) -> None:
    """Raise a one-line :class:`VcellError` naming ``where`` and the genes when a gene name repeats
    (a gene named twice cannot be matched between files, a model and a table)."""
    genes = pd.Index(genes)
    if not genes.is_unique:
        raise VcellError(f"{where}: duplicated gene names in var ({preview(genes[genes.duplicated()].unique(), 5)})")


def _gene_problems(adata: ad.AnnData, where: str) -> list[Problem]:
    names = pd.Index(adata.var_names)
    problems = []
    blank = np.flatnonzero(np.asarray([not str(n).strip() for n in names], dtype=bool))
    if blank.size:  # a gene no list, table or model can name
        problems.append(Problem("empty_gene_name", f"{where}: {blank.size} gene(s) without a name in var_names (first: "
                                                   f"gene {int(blank[0])}); name every gene"))
    if not names.is_unique:
        dup = names[names.duplicated()].unique()
        problems.append(Problem(
            "duplicated_genes",
            f"{where}: {len(dup)} duplicated gene names in var_names ({preview(dup, 6)}); "
            "make them unique (e.g. AnnData.var_names_make_unique()) or aggregate them",
        ))
    return problems


# Problems `vcell data check` lists (exit 1) but the other commands only warn about: vcell works on
# cell positions, never on names, so duplicated cell names do not change a result; labels that
# differ only in case, spaces or punctuation may be meant (two perturbations named alike); a gene
# without a name is still used (only a gene list or table cannot name it).
WARNING_KINDS = ("duplicated_cells", "similar_labels", "empty_gene_name")


def _similar_label_problems(adata: ad.AnnData, spec: DataSpec, where: str) -> list[Problem]:
    """Perturbation labels equal but for case, spaces, '-', '_' or '.' ('IRF1' and 'IRF1 ',
    'non-targeting' and 'non_targeting'): each is its own perturbation (one trained on while the
    other is held out, a control spelling trained and scored as a perturbation), never merged."""
    codes, labels = factorize(adata.obs[spec.pert_col])
    counts = np.bincount(codes[codes >= 0], minlength=len(labels))
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        # separators and dots go, except between two digits: a dose's '1.0' or '1_0' is not '10'
        key = re.sub(r"(?<!\d)[\s_\-.]+|[\s_\-.]+(?!\d)", "", str(label)).casefold()
        groups.setdefault(key, []).append(i)
    problems = []
    for members in (m for m in groups.values() if len(m) > 1):
        named = ", ".join(f"{labels[i]!r} ({counts[i]:,} cells)" for i in members)
        control = spec.control in {str(labels[i]) for i in members}
        why = (f"the others are not the control {spec.control!r}: they are trained on and scored as perturbations" if control
               else "each is its own perturbation (one may be trained on while another is held out)")
        problems.append(Problem("similar_labels", f"{where}: labels {named} in column {spec.pert_col!r} differ only in case, "
                                                  f"spaces or punctuation; {why}; relabel them if they are one"))
    return problems


def _cell_problems(adata: ad.AnnData, where: str) -> list[Problem]:
    names = pd.Index(adata.obs_names)
    if names.is_unique:
        return []
    dup = names[names.duplicated()].unique()
    n = int(names.duplicated(keep=False).sum())
    return [
        Problem(
            "duplicated_cells",
            f"{where}: {n} cells share {len(dup)} duplicated cell names in obs_names ({preview(dup, 6)}); "
            "make them unique (e.g. AnnData.obs_names_make_unique()), or other tools may mix these cells up",
        )
    ]


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
    adata: ad.AnnData, spec: DataSpec, path=None, chunk_rows: int = 4096, require_context_controls: bool | None = True
) -> CheckReport:
    """Check ``adata`` against ``spec`` and collect a full report (summary and every problem).

    ``require_context_controls=False`` turns a context without control cells into a warning
    (its perturbed cells are then left out of splits) instead of a problem; ``None`` into a debug
    line (a caller that reads one context's controls only, and refuses that context itself).
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
    report.problems += _cell_problems(adata, where)
    columns_ok = not any(p.kind == "missing_column" for p in report.problems)
    if columns_ok:
        for problem in _control_problems(adata, spec, where):
            if problem.kind == "control_absent_in_context" and not require_context_controls:
                say = log.debug if require_context_controls is None else log.warning
                say("%s; its perturbed cells will not be used", problem.message.split("; ")[0])
            else:
                report.problems.append(problem)
        report.contexts = context_summary(adata, spec)
        report.problems += _similar_label_problems(adata, spec, where)
    if spec.pert_col in adata.obs.columns:
        _, perts = factorize(adata.obs[spec.pert_col])
        report.n_perturbations = int(np.sum(perts != spec.control))
    stats = scan_matrix(adata.X, chunk_rows)
    report.expression = infer_expression_type(adata, spec.expression, stats, path)
    report.problems += expression_problems(adata, stats, report.expression, where)
    return report


def validate(adata: ad.AnnData, spec: DataSpec, path=None, require_context_controls: bool | None = True) -> ExpressionInfo:
    """Raise a one-line :class:`VcellError` for the first problem; return the expression type.

    Problems of the kinds in :data:`WARNING_KINDS` are logged as warnings instead.
    """
    report = check(adata, spec, path, require_context_controls=require_context_controls)
    for p in report.problems:
        if p.kind in WARNING_KINDS:
            log.warning("%s", p.message)
    problems = [p for p in report.problems if p.kind not in WARNING_KINDS]
    if problems:
        extra = (f" (and {len(problems) - 1} more problem(s); run `vcell data check`, or vcell.data.validate.check(adata, spec) "
                 "in Python)") if len(problems) > 1 else ""
        raise VcellError(problems[0].message + extra)
    assert report.expression is not None
    return report.expression
