"""``vcell eval run|baseline --profile vcc2026``: from files to output tables.

A reference may hold several contexts (cell lines) in an ``obs`` column (``context`` by
default); each is scored on its own, with its own controls, and the outputs of context ``C``
go to ``OUT/C/``. With one context (or no such column) they go to ``OUT`` itself. Several
predictions scored in one run (:func:`run_many`) share one pass over the reference, and the
outputs of prediction ``NAME`` go to ``OUT/NAME/``. Every output folder is checked before any
work, and all files are written atomically only once everything has been computed.

Files: ``results.csv`` + ``agg_results.csv`` (``run``: the model; cell-eval2's layouts);
``baseline_results.csv`` + ``baseline_agg_results.csv``, ``anchor_splits.csv`` +
``anchor_agg.csv`` and ``scale.json`` (``baseline``: the two ends of the scale). ``vcell eval
score`` reads them: :mod:`vcell.eval.vcc2026.score_files`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vcell.data.io import atomic_paths, check_output_dir, subfolder, subfolders
from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError, control_hint, did_you_mean, preview
from vcell.eval.csvio import write_csv
from vcell.eval.tiles import Scratch, TileStore
from vcell.eval.vcc2026.anchor import BASE_SEED, N_SPLITS, AnchorPlan, AnchorResult
from vcell.eval.vcc2026.baseline import BASELINE_SEED, baseline_summary, profile_from_means, profile_task
from vcell.eval.vcc2026.engine import Engine, MeansTask, run_tasks
from vcell.eval.vcc2026.evaluate import Reference, evaluate_cells, evaluate_summary, reference_tasks, resolve_targets
from vcell.eval.vcc2026.inputs import (
    CountsCells,
    check_genes,
    check_perturbations,
    close_cells,
    read_cells,
    read_target_map,
    refuse_unlabelled,
)
from vcell.eval.vcc2026.reader import (
    CONTEXT_COLUMN,
    DATA_CONTEXT_COLUMN,
    UPLOAD_PERT_COL,
    ObsColumns,
    prediction_pert_col,
    read_obs,
)
from vcell.eval.vcc2026.scale import (
    degenerate,
    degenerate_note,
    standard_errors,
    unresolved,
    unresolved_note,
)
from vcell.eval.vcc2026.tables import agg_means, agg_wide, results_long

log = logging.getLogger(__name__)

RUN_FILES = ("results.csv", "agg_results.csv")
SCALE_FILES = ("baseline_results.csv", "baseline_agg_results.csv", "anchor_splits.csv", "anchor_agg.csv", "scale.json")


@dataclass
class Options:
    """What every vcc2026 command shares."""

    pert_col: str = "target_gene"
    control: str = "non-targeting"
    context_col: str = CONTEXT_COLUMN
    target_genes: str | os.PathLike | None = None
    no_target_genes: bool = False
    threads: int = 2
    strict: bool = True  # refuse what cell-eval2 refuses (an undefined panel ratio, one-cell groups in the anchor)
    budget: float = math.inf  # bytes a matrix may take in memory; above, gene tiles on disk (vcell.eval.bands)
    progress: Progress = no_progress

    def engine(self) -> Engine:
        """How the passes over the counts run."""
        return Engine(self.threads, self.budget, self.progress)


def _contexts(path, col: str, obs: ObsColumns, required: bool) -> list[str] | None:
    """The contexts of a file (None: no context column and none required)."""
    if col not in obs.columns:
        if required:
            raise VcellError(f"{path}: context column {col!r} not found in obs (the reference has it; columns: {preview(obs.names, 10)})")
        return None
    values = obs.columns[col][0]
    if (values == "").any():
        raise VcellError(f"{path}: context column {col!r} has cells without a context")
    names = sorted(set(values))
    for name in names:
        subfolder(name, f"{path}: context")
    return names


def _read_meta(path, opts: Options, prediction: bool = False) -> ObsColumns:
    upload = [UPLOAD_PERT_COL] if prediction else []
    return read_obs(path, [opts.pert_col, *upload, opts.context_col, DATA_CONTEXT_COLUMN])


def _reference_contexts(path, opts: Options, obs: ObsColumns) -> list[str] | None:
    """The reference's contexts (None: one context). Only the default column may be absent (cell-eval2's
    rule: no ``context`` column, one context); a column the user named must be there, or be ``none``."""
    col = opts.context_col
    if not col or col.lower() == "none":
        return None
    if col != CONTEXT_COLUMN and col not in obs.names:
        raise VcellError(f"{path}: context column {col!r} not found in obs{did_you_mean(col, obs.names)} "
                         f"(columns: {preview(obs.names, 10)}); --context-col none scores every cell as one context")
    contexts = _contexts(path, col, obs, required=False)
    if contexts is None:
        _one_context(path, opts, obs)
    return contexts


def _one_context(path, opts: Options, obs: ObsColumns) -> None:
    """Warn when a reference scored as one context has several in vcell's data context column:
    their controls and perturbations would be pooled."""
    if DATA_CONTEXT_COLUMN in obs.columns and DATA_CONTEXT_COLUMN != opts.context_col:
        values = sorted(set(obs.columns[DATA_CONTEXT_COLUMN][0]) - {""})
        if len(values) > 1:
            log.warning("%s: no %r column, so every cell is one context, but column %r holds %d (%s): pass --context-col %s "
                        "to score each on its own", path, opts.context_col, DATA_CONTEXT_COLUMN, len(values), preview(values, 3),
                        DATA_CONTEXT_COLUMN)


def _labels(meta: ObsColumns, path, pert_col: str) -> np.ndarray:
    if pert_col not in meta.columns:
        hint = did_you_mean(pert_col, meta.names)
        raise VcellError(f"{path}: perturbation column {pert_col!r} not found in obs{hint} (columns: {preview(meta.names, 20)})")
    return refuse_unlabelled(meta.columns[pert_col][0], path)


def _context_cells(cells: CountsCells, contexts: np.ndarray | None, name: str | None) -> CountsCells:
    """The cells of one context, without copying the matrix (other cells lose their label)."""
    if name is None:
        return cells
    labels = np.where(contexts == name, cells.labels, "").astype(object)
    order = [g for g in cells.group_order if g in set(labels)]
    out = CountsCells(cells.X, labels, cells.genes, f"{cells.where} (context {name})", order, cells.totals)
    c = cells.controls
    if c is not None:
        sub = np.where(contexts[c.source_rows] == name, c.labels, "").astype(object)
        out.controls = CountsCells(c.X, sub, c.genes, out.where, None, c.totals, source_rows=c.source_rows)
    return out


def _sum_groups(labels: np.ndarray, contexts: np.ndarray | None, skip: str | None = None) -> tuple[np.ndarray, dict]:
    """Each row's group for the sums taken while a file is read (one group per context and
    label; ``skip`` and unlabelled rows: -1), and ``(context, label) -> group``."""
    ctx = contexts if contexts is not None else np.full(labels.shape, "", dtype=object)
    c_codes, c_names = pd.factorize(pd.Series(ctx, dtype=object).astype(str))
    l_codes, l_names = pd.factorize(pd.Series(labels, dtype=object).astype(str))
    keys = c_codes.astype(np.int64) * len(l_names) + l_codes
    keys[(labels == "") | ((labels == skip) if skip is not None else False)] = -1
    codes, pairs = pd.factorize(keys, use_na_sentinel=False)
    out = codes.astype(np.int64)
    index = {}
    for i, k in enumerate(pairs):
        if k >= 0:
            index[(str(c_names[k // len(l_names)]), str(l_names[k % len(l_names)]))] = i
        else:
            out[codes == i] = -1
    return out, index


def _priors(cells: CountsCells, index: dict, context: str | None) -> dict | None:
    """label -> summed counts of one context, from the sums taken while the file was read."""
    if cells.group_sums is None:
        return None
    ctx = "" if context is None else context
    return {label: cells.group_sums[i] for (c, label), i in index.items() if c == ctx}


def _bounds(cells: CountsCells) -> np.ndarray | None:
    """The gene tiles of a reference read in tiles (a prediction swept with it follows them)."""
    for c in (cells.controls, cells):
        if c is not None and isinstance(c.X, TileStore) and c.X.n_tiles > 1:
            return c.X.bounds
    return None




def _perturbations(real: CountsCells, opts: Options, target_map) -> tuple[list[str], np.ndarray]:
    """The sorted perturbations of a reference context and their target genes (resolved per ``opts``)."""
    perts = sorted(set(real.labels) - {opts.control, ""})
    if opts.control not in set(real.labels):
        raise VcellError(f"{real.where}: no control cells labelled {opts.control!r} in column {opts.pert_col!r}"
                         f"{control_hint(opts.control, perts)}")
    if not perts:
        raise VcellError(f"{real.where}: no perturbed cells besides the controls {opts.control!r}")
    return perts, resolve_targets(perts, real.genes, target_map, opts.no_target_genes)


def reference_context(real: CountsCells, opts: Options, target_map, extra=None, prior: dict | None = None) -> tuple[Reference, list[str]]:
    """A reference context summarised, with its sorted perturbations (targets resolved per ``opts``);
    ``extra`` tasks run in the same passes over the counts; ``prior``: label -> summed counts."""
    perts, targets = _perturbations(real, opts, target_map)
    ctrl_task, task, finish = reference_tasks(real, opts.control, perts, prior)
    run_tasks([ctrl_task, task, *(extra or [])], opts.engine(), "reference")
    return finish(targets), perts


def _target_map(opts: Options, labels: np.ndarray):
    return read_target_map(opts.target_genes, sorted(set(labels) - {opts.control})) if opts.target_genes is not None else None


def run(pred, real, out, opts: Options, overwrite: bool = False, report: Callable[[str], None] | None = None) -> dict[str, pd.DataFrame]:
    """Score a prediction against the reference: ``results.csv`` and ``agg_results.csv`` per context
    (:func:`run_many` with ``{"": pred}``).

    Returns context -> ``agg_results`` ('' for a single context).
    """
    return run_many({"": pred}, real, out, opts, overwrite, report)[""]


def run_many(preds: Mapping[str, str | os.PathLike], real, out, opts: Options, overwrite: bool = False,
             report: Callable[[str], None] | None = None) -> dict[str, dict[str, pd.DataFrame]]:
    """Score predictions against one reference, read and summarised once: the outputs of
    prediction ``NAME`` in ``OUT/NAME/`` as a run of its own writes them (name ``""``, alone: in ``OUT``).

    Returns name -> context -> ``agg_results``.
    """
    preds = {key: Path(p) for key, p in preds.items()}
    folder = subfolders(preds, "prediction name")
    report = report or (lambda _: None)
    out = Path(out)
    real_obs = _read_meta(real, opts)
    contexts = _reference_contexts(real, opts, real_obs)
    labels_real = _labels(real_obs, real, opts.pert_col)
    target_map = _target_map(opts, labels_real)
    metas = {}
    for key, pred in preds.items():  # every prediction's columns, labels and contexts checked before any work
        pred_obs = _read_meta(pred, opts, prediction=True)
        pert_col = prediction_pert_col(pred_obs.names, opts.pert_col, str(pred))
        pred_ctx = _contexts(pred, opts.context_col, pred_obs, required=contexts is not None) if contexts is not None else None
        if pred_ctx is not None and set(pred_ctx) - set(contexts):
            raise VcellError(f"{pred}: context(s) {preview(sorted(set(pred_ctx) - set(contexts)), 3)} not in {real}")
        labels_pred = _labels(pred_obs, pred, pert_col)
        check_perturbations(labels_pred, labels_real, opts.control, str(pred), str(real))
        metas[key] = (pred_obs, labels_pred, pert_col)
    names = [f"{folder[key]}{subfolder(c, 'context')}{f}" for key in preds for c in (contexts or [None]) for f in RUN_FILES]
    check_output_dir(out, names, [real, *preds.values()], overwrite=overwrite)
    # One matrix in memory at a time (or one band of it, for a matrix on disk): the reference is
    # summarised (its controls kept) and released before the predictions are read, one by one.
    tables = {}
    with Scratch(out) as scratch:
        t = time.perf_counter()
        real_ctx = real_obs.columns[opts.context_col][0] if contexts else None
        groups, index = _sum_groups(labels_real, real_ctx)
        real_cells = read_cells(real, opts.pert_col, opts.control, opts.budget, scratch, opts.progress, "real", groups=groups)
        refs = {}
        controls = real_cells.controls
        try:
            for name in contexts or [None]:
                r = _context_cells(real_cells, real_ctx, name)
                refs[name] = (reference_context(r, opts, target_map, prior=_priors(real_cells, index, name)), r.where)
            genes, bounds = real_cells.genes, _bounds(real_cells)
            real_cells.controls = None
            close_cells(real_cells)  # the controls stay: the predictions are scored against them
            del real_cells, r
            gc.collect()
            report(f"reference summarised in {time.perf_counter() - t:.1f} s")
            for key, pred in preds.items():
                t = time.perf_counter()
                for name, table in _score_prediction(pred, metas[key], real, refs, genes, bounds, contexts, opts, scratch).items():
                    tables[key, name] = table
                gc.collect()  # this prediction's matrix is gone before the next one is read
                report(f"{pred} scored in {time.perf_counter() - t:.1f} s")
        finally:
            if controls is not None:
                close_cells(controls)
    with atomic_paths(out, names) as tmp:
        for (key, name), (res, agg) in tables.items():
            where = f"{folder[key]}{subfolder(name, 'context')}"
            write_csv(res, tmp[f"{where}results.csv"])
            write_csv(agg, tmp[f"{where}agg_results.csv"])
    aggs: dict[str, dict[str, pd.DataFrame]] = {key: {} for key in preds}
    for (key, name), (_, agg) in tables.items():
        aggs[key][name] = agg
    return aggs


def _score_prediction(pred: Path, meta, real, refs: dict, genes, bounds, contexts, opts: Options, scratch) -> dict:
    """context -> (results, agg_results) of one prediction against the summarised reference ``refs``."""
    pred_obs, labels_pred, pert_col = meta
    pred_ctx_values = pred_obs.columns[opts.context_col][0] if contexts else None
    groups, index = _sum_groups(labels_pred, pred_ctx_values, opts.control)
    pred_cells = read_cells(pred, pert_col, None, opts.budget, scratch, opts.progress, "pred", bounds, groups)
    tables = {}
    try:
        check_genes(pred_cells.genes, genes, str(pred), str(real))
        for name in contexts or [None]:
            (ref, perts), real_where = refs[name]
            p = _context_cells(pred_cells, pred_ctx_values, name)
            check_perturbations(p.labels, np.array(perts + [opts.control], dtype=object), opts.control, p.where, real_where)
            values, ratio = evaluate_cells(ref, p, opts.threads, engine=opts.engine(), prior=_priors(pred_cells, index, name))
            res = results_long(perts, values)
            tables[name or ""] = (res, agg_wide(res, ratio))
    finally:
        close_cells(pred_cells)
    return tables


def scale_ends(real, out, opts: Options, splits: int = N_SPLITS, anchor_seed: int = BASE_SEED, seed: int = BASELINE_SEED,
               anchor: bool = True, baseline: bool = True, overwrite: bool = False,
               report: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The two ends of the scale of every context of ``real``: the baseline scored, the replicate anchor.

    Returns context -> {"baseline": agg_results or None, "anchor": anchor agg or None}.
    """
    if not (anchor or baseline):
        raise VcellError("nothing to compute: both the baseline and the anchor are switched off")
    report = report or (lambda _: None)
    out = Path(out)
    real_obs = _read_meta(real, opts)
    contexts = _reference_contexts(real, opts, real_obs)
    files = ["scale.json"] + (list(SCALE_FILES[:2]) if baseline else []) + (list(SCALE_FILES[2:4]) if anchor else [])
    names = [f"{subfolder(c, 'context')}{f}" for c in (contexts or [None]) for f in files]
    check_output_dir(out, names, [real], overwrite=overwrite)
    target_map = _target_map(opts, _labels(real_obs, real, opts.pert_col))
    done: dict[str, dict] = {}
    outputs = {}
    scales = {}
    with Scratch(out) as scratch:
        real_cells = read_cells(real, opts.pert_col, opts.control, opts.budget, scratch, opts.progress, "real")
        controls = real_cells.controls
        try:
            real_ctx = real_obs.columns[opts.context_col][0] if contexts else None
            for name in contexts or [None]:
                r = _context_cells(real_cells, real_ctx, name)
                where = f" of context {name}" if name else ""
                scales[name] = _context_scale(r, opts, target_map, splits, anchor_seed, anchor, baseline,
                                              report=lambda text, where=where: report(text + where))
            real_cells.controls = None
            close_cells(real_cells)  # the baselines need only the controls: the reference's matrix goes first
            del real_cells, r
            gc.collect()
            for name, (cs, pending) in scales.items():
                if pending is not None:
                    _score_baseline(cs, pending, seed, opts,
                                    lambda text, name=name: report(text + (f" of context {name}" if name else "")))
        finally:
            if controls is not None:
                close_cells(controls)
    for name, (cs, _) in scales.items():
        if cs.anchor is not None and cs.baseline_agg is not None:
            caveats, where = cs.caveats(), f"{real}" + (f", context {name}" if name else "")
            if caveats["degenerate"]:
                log.warning("%s: %s: `vcell eval score` refuses it, as cell-eval2 does", where, degenerate_note(caveats["degenerate"]))
            if caveats["unresolved"]:
                log.warning("%s: %s", where, unresolved_note(caveats["unresolved"]))
        files_ctx = {}
        if cs.anchor is not None:
            files_ctx["anchor_splits.csv"] = cs.anchor.splits
            files_ctx["anchor_agg.csv"] = cs.anchor.agg
        if cs.baseline_agg is not None:
            files_ctx["baseline_results.csv"] = cs.baseline_results
            files_ctx["baseline_agg_results.csv"] = cs.baseline_agg
        files_ctx["scale.json"] = {
            "profile": "vcc2026", "reference": str(real), "context": name, "perturbations": len(cs.perturbations),
            "control_cells": cs.ref.ctrl.n_cells, "pert_col": opts.pert_col, "control": opts.control,
            "anchor": {"splits": splits, "base_seed": anchor_seed} if anchor else None,
            "baseline": {"seed": seed} if baseline else None,
            "target_genes": "none" if opts.no_target_genes else (str(opts.target_genes) if opts.target_genes else "labels"),
        }
        outputs[name] = files_ctx
        done[name or ""] = {"baseline": cs.baseline_agg, "anchor": cs.anchor.agg if cs.anchor is not None else None}
    with atomic_paths(out, names) as tmp:
        for name, files_ctx in outputs.items():
            for fname, obj in files_ctx.items():
                path = tmp[f"{subfolder(name, 'context')}{fname}"]
                if fname.endswith(".json"):
                    path.write_text(json.dumps(obj, indent=2) + "\n")
                else:
                    write_csv(obj, path)
    return done


@dataclass
class ContextScale:
    """Both ends of the scale of one reference context (either may be absent)."""

    ref: Reference
    perturbations: list[str]
    baseline_results: pd.DataFrame | None = None
    baseline_agg: pd.DataFrame | None = None
    anchor: AnchorResult | None = None

    def ends(self) -> tuple[dict[str, float], dict[str, float] | None]:
        """(baseline aggregates, replicate aggregates or None), metric -> value."""
        b = agg_means(self.baseline_agg) if self.baseline_agg is not None else {}
        r = dict(zip(self.anchor.agg["metric"], self.anchor.agg["replicate"])) if self.anchor is not None else None
        return b, r

    def caveats(self) -> dict[str, list[str]]:
        """The metrics whose scale is ``degenerate`` or ``unresolved`` (:mod:`vcell.eval.vcc2026.scale`), each list as those functions give it."""
        b, r = self.ends()
        if self.anchor is None:
            return {"degenerate": degenerate(b, None), "unresolved": []}
        return {"degenerate": degenerate(b, r), "unresolved": unresolved(b, r, self.replicate_se())}

    def replicate_se(self) -> dict[str, float]:
        """Metric -> the replicate's standard error over the anchor's splits (empty without an anchor)."""
        if self.anchor is None:
            return {}
        return standard_errors(self.anchor.agg, int(self.anchor.splits["split_index"].nunique()))


def context_scale(r: CountsCells, opts: Options, target_map=None, splits: int = N_SPLITS, anchor_seed: int = BASE_SEED,
                  seed: int = BASELINE_SEED, anchor: bool = True, baseline: bool = True,
                  report: Callable[[str], None] | None = None) -> ContextScale:
    """The baseline and the replicate anchor of one reference context (its cells ``r``)."""
    scale, pending = _context_scale(r, opts, target_map, splits, anchor_seed, anchor, baseline, report)
    if pending is not None:
        _score_baseline(scale, pending, seed, opts, report)
    return scale


def _context_scale(r, opts, target_map, splits, anchor_seed, anchor, baseline, report):
    """Everything that reads the reference's matrix, in as few passes as memory allows: the
    summary, the anchor (its first splits with the summary) and the baseline's profile
    (returned with the group sizes, to summarise and score the baseline once the matrix is gone)."""
    report = report or (lambda _: None)
    engine = opts.engine()
    perts, targets = _perturbations(r, opts, target_map)
    t = time.perf_counter()
    ctrl_task, task, finish = reference_tasks(r, opts.control, perts)
    tasks = [ctrl_task, task]
    means = profile_task(r, perts) if baseline else None
    ctrl_means = MeansTask(ctrl_task.A, [ctrl_task.ctrl_rows]) if baseline else None  # the baseline's scale, in the same pass
    tasks += [means, ctrl_means] if baseline else []
    plan = AnchorPlan(r, opts.control, perts, anchor_seed, splits, opts.strict) if anchor else None
    groups = plan.groups(opts.budget) if plan is not None else [[]]
    if plan is not None:
        tasks += plan.tasks(groups[0])
    run_tasks(tasks, engine, "reference" + (" and replicate anchor" if plan is not None else ""))
    del tasks  # the first splits' sums (~0.5 GB at a context's size) go once scored, before the next splits' pass
    out = ContextScale(finish(targets), perts)
    report(f"reference summarised in {time.perf_counter() - t:.1f} s")
    if plan is not None:
        for i, group in enumerate(groups):
            if i:
                run_tasks(plan.tasks(group), engine, "replicate anchor")
            plan.score(out.ref, group)
            report(f"anchor split {group[-1] + 1}/{splits}")
        out.anchor = plan.result()
        report(f"replicate anchor in {time.perf_counter() - t:.1f} s")
    pending = None
    if means is not None:
        pending = (profile_from_means(means.means, out.ref, r.where), {p: r.rows(p).size for p in perts}, opts.strict,
                   ctrl_means.means[0])
    return out, pending


def _score_baseline(scale: ContextScale, pending, seed: int, opts: Options, report=None) -> None:
    t = time.perf_counter()
    profile, sizes, strict, ctrl_mean = pending
    side = baseline_summary(profile, scale.ref, sizes, seed, opts.engine(), ctrl_mean)
    values, ratio = evaluate_summary(scale.ref, side, strict)
    scale.baseline_results = results_long(scale.perturbations, values)
    scale.baseline_agg = agg_wide(scale.baseline_results, ratio)
    if report is not None:
        report(f"baseline scored in {time.perf_counter() - t:.1f} s")
