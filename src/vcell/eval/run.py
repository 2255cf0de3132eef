"""The evaluation pipeline behind ``vcell eval run``: check inputs, DE, metrics, tables.

Everything is computed before anything is written, so a failure leaves no partial output;
each output file is then written atomically.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell._heap import cycles_collected_promptly
from vcell.data.aggregate import group_sums
from vcell.data.io import atomic_paths, check_output_dir, read_h5ad, subfolder, subfolders
from vcell.data.preprocess_stream import Progress, no_progress
from vcell.errors import VcellError
from vcell.eval.bands import DEFAULT_BUDGET, sweep
from vcell.eval.contexts import context_masks, remove_files, write_context_files
from vcell.eval.csvio import write_de_csv
from vcell.eval.de import DEResult, de_arrays
from vcell.eval.inputs import INPUT_TYPES, EvalPair, check_structure, warn_mixed_spaces
from vcell.eval.metrics import (
    DEData,
    EnergyDistances,
    ExpressionData,
    as_cell_eval_bulk,
    energy_distances,
    get_metric,
    pseudobulk,
)
from vcell.eval.profiles import compute_results, selected_metrics
from vcell.eval.scoring import agg_results, write_csv
from vcell.eval.sides import Side, open_side, side_from_anndata
from vcell.eval.tiles import Scratch, TileStore

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What an evaluation produced: per-perturbation results, their aggregate, the DE tables."""

    results: pd.DataFrame
    agg: pd.DataFrame
    real_de: pd.DataFrame | None
    pred_de: pd.DataFrame | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SideSummary:
    """What the metrics need from one side (real or pred), so its matrix can be released."""

    bulk: np.ndarray  # [perturbations + control, genes] float64 means (control last)
    de: pd.DataFrame | None
    energy: np.ndarray | None
    de_result: DEResult | None = None  # the arrays behind ``de``
    expression: str = "log1p"  # what the side's file held (:attr:`Side.expression`)


def summarise(adata, pert_col: str, control: str, perturbations: list[str], need_de: bool, need_energy: bool, threads: int) -> SideSummary:
    """Pseudobulks, DE table and (if needed) energy distances of one in-memory log1p AnnData."""
    return summarise_side(side_from_anndata(adata, pert_col, "data"), control, perturbations, need_de, need_energy, threads)


def summarise_side(side: Side, control: str, perturbations: list[str], need_de: bool, need_energy: bool, threads: int,
                   budget: float = math.inf, progress: Progress = no_progress) -> SideSummary:
    """Pseudobulks, DE table and (if needed) energy distances of one side (its matrix in memory or
    as gene tiles on disk, read band by band within ``budget`` bytes)."""
    labels = side.labels.astype(str).to_numpy()
    order = [*perturbations, control]
    de = de_result = bulk = None
    if need_de:
        de_result = de_arrays(side.X, side.labels, control, var_names=side.genes, threads=threads, budget=budget, progress=progress)
        de = de_result.to_frame()
        bulk = _bulk_from_de(de_result, order)
    if bulk is None:
        bulk = pseudobulk(side.X, labels, order) if not isinstance(side.X, TileStore) else _tile_bulk(side.X, labels, order, budget)
    bulk = as_cell_eval_bulk(bulk, side.X.dtype)
    energy = None
    if need_energy:
        energy = energy_distances(
            perturbations,
            lambda p: side.rows(np.flatnonzero(labels == p)),
            side.rows(np.flatnonzero(labels == control)),
        )
    return SideSummary(bulk=bulk, de=de, energy=energy, de_result=de_result, expression=side.expression)


def _tile_bulk(store: TileStore, labels: np.ndarray, order: list[str], budget: float) -> np.ndarray:
    """:func:`pseudobulk` of a matrix in gene tiles: the same float64 sums in row order, tile by tile."""
    rows = pd.Index(order).get_indexer(labels)
    sums = np.zeros((len(order), store.n_genes), np.float64)
    for _, parts in sweep([store], budget):  # noqa: B007
        for data, indices, indptr in parts[0]:
            sums += group_sums(sp.csr_matrix((data, indices, indptr), shape=(store.n_rows, store.n_genes)), rows, len(order))
    counts = np.bincount(rows[rows >= 0], minlength=len(order)).astype(np.float64)
    if np.any(counts == 0):
        raise VcellError(f"no cells for group(s) {', '.join(np.asarray(order)[counts == 0][:5])}")
    return sums / counts[:, None]


def _bulk_from_de(res: DEResult, order: list[str]) -> np.ndarray | None:
    """:func:`pseudobulk` of the groups ``order`` (control last) from the DE's sums (the same
    float64 sums in row order), or ``None`` when a group is not one of the DE's groups."""
    names = [str(res.reference), *(str(t) for t in res.targets)]
    index = {name: i for i, name in enumerate(names)}
    if res.log_sums is None or len(index) != len(names) or any(name not in index for name in order):
        return None
    rows = np.array([index[name] for name in order[:-1]] + [0], dtype=np.int64)
    sizes = np.concatenate([[res.ref_membership], res.target_membership]).astype(np.float64)
    return res.log_sums[rows] / sizes[rows][:, None]


def _needs(names: list[str]) -> tuple[bool, bool]:
    return any(get_metric(n).kind == "de" for n in names), "pearson_edistance" in names


def score_summaries(
    real: SideSummary, pred: SideSummary, perturbations: list[str], genes, names: list[str], timings: dict
) -> EvalResult:
    """Metrics of a profile from the two sides' summaries."""
    t = time.perf_counter()
    if real.de is None:
        de = None
    elif real.de_result is not None and pred.de_result is not None:
        de = DEData.from_results(real.de_result, pred.de_result, real.de, pred.de)
    else:
        de = DEData(real.de, pred.de)
    energy = EnergyDistances(real=real.energy, pred=pred.energy) if real.energy is not None else None
    expression = ExpressionData(
        perturbations=np.asarray(perturbations), genes=np.asarray(genes), real=real.bulk[:-1], pred=pred.bulk[:-1],
        real_control=real.bulk[-1], pred_control=pred.bulk[-1], energy=energy,
    )
    results = compute_results(expression, de, names)
    timings["metrics"] = time.perf_counter() - t
    return EvalResult(results=results, agg=agg_results(results), real_de=real.de, pred_de=pred.de, timings=timings)


def evaluate(pair: EvalPair, profile: str = "vcc", threads: int = 2, skip: tuple[str, ...] = ()) -> EvalResult:
    """Score a checked, in-memory prediction against the truth with a metric profile (cell-eval's numbers)."""
    names = selected_metrics(profile, skip)
    need_de, need_energy = _needs(names)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    sides = [summarise(a, pair.pert_col, pair.control, pair.perturbations, need_de, need_energy, threads) for a in (pair.real, pair.pred)]
    timings["de+pseudobulk"] = time.perf_counter() - t
    return score_summaries(*sides, pair.perturbations, pair.genes, names, timings)


def write_outputs(result: EvalResult, out: str | os.PathLike, prefix: str | None = None) -> list[Path]:
    """Write ``results.csv``, ``agg_results.csv`` and the DE tables into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = (lambda base: f"{prefix}_{base}") if prefix else (lambda base: base)
    written = [out / name("results.csv"), out / name("agg_results.csv")]
    write_csv(result.results, written[0])
    write_csv(result.agg, written[1])
    for table, base in ((result.real_de, "real_de.csv"), (result.pred_de, "pred_de.csv")):
        if table is not None:
            path = out / name(base)
            write_de_csv(table, path)
            written.append(path)
    return written


#: Every file ``vcell eval run`` may write into its output folder.
OUTPUT_NAMES = ("results.csv", "agg_results.csv", "real_de.csv", "pred_de.csv")


def run(pred: str | os.PathLike, real: str | os.PathLike, out: str | os.PathLike, *args, **kwargs) -> tuple[EvalResult, list[Path]]:
    """Load, check, evaluate and write: the whole of ``vcell eval run`` for one prediction, its
    files in ``out`` (:func:`run_many` with ``{"": pred}``, whose options it takes)."""
    return run_many({"": pred}, real, out, *args, **kwargs)[""]


def run_many(
    preds: Mapping[str, str | os.PathLike],
    real: str | os.PathLike,
    out: str | os.PathLike,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    profile: str = "vcc",
    threads: int = 2,
    input_type: str = "auto",
    backed: bool = True,
    skip: tuple[str, ...] = (),
    overwrite: bool = False,
    option: str = "--expression",
    budget: float = DEFAULT_BUDGET,
    progress: Progress = no_progress,
    context_col: str | None = None,
) -> dict[str, tuple[EvalResult, list[Path]]]:
    """Score predictions against one reference, read and summarised once: prediction ``NAME``'s
    files in ``OUT/NAME/`` as a run of its own writes them (name ``""``, alone: in ``OUT``).

    The output folder is checked first (writable; results of an earlier run there are replaced
    only with ``overwrite``, and then those this run does not write are removed too). The
    structure of every file is checked next from its ``obs``/``var`` alone; then each side is
    read, checked, summarised and released in turn, so only one matrix is in memory at a time.
    A side whose matrix does not fit in ``budget`` bytes is read once into gene tiles on disk,
    beside ``out``, and tested band by band (:mod:`vcell.eval.bands`); ``backed=False`` reads
    every matrix whole (no budget). Nothing is written unless everything succeeded. ``option``
    is how messages name the option that declares ``input_type`` (the command line's spelling).

    With ``context_col`` (an ``obs`` column of every file, holding the same contexts), each
    context is scored apart, as cell-eval 0.8's ``--celltype-col`` does: its cells are copied
    out of each file beside ``out`` (:mod:`vcell.eval.contexts`) and scored as a pair of their
    own into ``OUT[/NAME]/CONTEXT/``; the results are then keyed ``(name, context)``.

    Returns name (or ``(name, context)``) -> (result, paths written); with several predictions
    or contexts the results hold no DE tables (they are in the files), so memory does not grow
    with their number.
    """
    if input_type not in INPUT_TYPES:
        raise VcellError(f"{option} {input_type!r}: use one of {', '.join(INPUT_TYPES)}")
    preds = {key: Path(p) for key, p in preds.items()}
    real = Path(real)
    folder = subfolders(preds, "prediction name")
    names = selected_metrics(profile, skip)
    need_de, need_energy = _needs(names)
    t = time.perf_counter()

    def check_outputs(masks: dict) -> dict:  # (name, context) -> the folder prefix of that run's files
        prefix = {(k, c): folder[k] + subfolder(c, f"{real}: context") for k in preds for c in masks}
        check_output_dir(out, [p + n for p in prefix.values() for n in OUTPUT_NAMES], [*preds.values(), real], overwrite=overwrite)
        return prefix

    masks = {None: None}
    if context_col is None:  # the outputs are known: checked before any file is read
        prefix = check_outputs(masks)
    metas = {REAL: read_h5ad(real, backed=True)}
    try:  # every prediction checked against the reference, in every context, before any matrix is read
        metas.update({key: read_h5ad(path, backed=True) for key, path in preds.items()})
        paths = {REAL: real, **preds}
        if context_col is not None:
            masks = context_masks(metas, paths, context_col, REAL)
        checks = {c: _check_context(metas, paths, masks[c], c, pert_col, control) for c in masks}
        genes = metas[REAL].var_names.copy()
    finally:
        for meta in metas.values():
            meta.file.close()
    if context_col is not None:  # the contexts name the outputs
        prefix = check_outputs(masks)
    checked = time.perf_counter() - t
    names_out = ["results.csv", "agg_results.csv", *(["real_de.csv", "pred_de.csv"] if need_de else [])]
    # The DE tables are written (to temporary files) in the background while the next side is
    # read and scored; all files are renamed into place only when everything succeeded.
    budget = budget if backed else math.inf
    done = {}
    with (cycles_collected_promptly(), atomic_paths(out, [p + n for p in prefix.values() for n in names_out]) as tmp,
          ThreadPoolExecutor(2) as writer, Scratch(out) as scratch):
        for c, (perturbations, reorder, where) in checks.items():
            files = paths if c is None else write_context_files(paths, masks[c], scratch.folder(), "context", budget)
            try:
                timings: dict[str, float] = {"check": checked}
                real_side = _side(files[REAL], real, where[REAL], "real", None, pert_col, input_type, scratch, backed, option, progress, control,
                                  perturbations, need_de, need_energy, threads, budget, timings)
                real_writes = [writer.submit(write_de_csv, _de_table(real_side), tmp[f"{prefix[k, c]}real_de.csv"], threads=1)
                               for k in preds] if need_de else []
                for key in preds:
                    own = dict(timings)
                    pred_side = _side(files[key], preds[key], where[key], "pred", genes if reorder[key] else None, pert_col, input_type,
                                      scratch, backed, option, progress, control, perturbations, need_de, need_energy, threads, budget, own)
                    warn_mixed_spaces(where[REAL], real_side.expression, where[key], pred_side.expression)
                    writes = []
                    if need_de:  # the last table is on the critical path: format it on more threads
                        writes = [writer.submit(write_de_csv, _de_table(pred_side), tmp[f"{prefix[key, c]}pred_de.csv"],
                                                threads=max(1, threads))]
                    result = _finish([real_side, pred_side], perturbations, genes, names, own,
                                     {n: tmp[prefix[key, c] + n] for n in names_out}, real_writes + writes)
                    if len(preds) > 1 or c is not None:  # kept in their files: memory does not grow with the runs
                        result.real_de = result.pred_de = None
                    done[key, c] = result
                    del pred_side
                del real_side
            finally:
                if c is not None:
                    remove_files(files)
    for p in prefix.values():
        for stale in set(OUTPUT_NAMES) - set(names_out):  # an earlier run's, replaced (--overwrite)
            (Path(out) / f"{p}{stale}").unlink(missing_ok=True)
    return {k if c is None else (k, c): (result, [Path(out) / f"{prefix[k, c]}{n}" for n in names_out]) for (k, c), result in done.items()}


REAL = "\0real"  # the reference's key among the files (a prediction's name is a file name: never this)


def _check_context(metas, paths, masks, context, pert_col, control) -> tuple[list[str], dict[str, bool], dict[str, str]]:
    """:func:`check_structure` of every prediction against the reference, on one context's cells
    (all cells for ``context`` None): its perturbations, which predictions' genes to reorder, and
    how messages name each file."""
    where = {key: str(path) if context is None else f"{path} (context {context})" for key, path in paths.items()}
    real = metas[REAL] if context is None else metas[REAL][masks[REAL]]
    reorder = {}
    for key, meta in metas.items():
        if key != REAL:
            pred = meta if context is None else meta[masks[key]]
            perturbations, reorder[key] = check_structure(pred, real, pert_col, control, where[key], where[REAL])
    return perturbations, reorder, where


def _side(path, source, where, side, order, pert_col, input_type, scratch, backed, option, progress, control, perturbations,
          need_de, need_energy, threads, budget, timings) -> SideSummary:
    """One side read, summarised and released (its matrix unmapped before the next is read). ``path``
    is read: the file ``source``, or a copy of one context's cells of it; ``where`` names it in messages."""
    t = time.perf_counter()
    data = open_side(path, pert_col, input_type, order, budget, scratch, backed, option, progress, side, where=where)
    timings[f"load {Path(source).name}"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        summary = summarise_side(data, control, perturbations, need_de, need_energy, threads, budget, progress)
    finally:
        data.close()
    timings[f"de+pseudobulk {Path(source).name}"] = time.perf_counter() - t
    del data
    gc.collect()  # AnnData holds reference cycles: unmap this side's matrix before the next is read
    return summary


def _de_table(side: SideSummary):
    return side.de_result if side.de_result is not None else side.de


def _finish(sides, perturbations, genes, names, timings, tmp, writes) -> EvalResult:
    """Metrics and the small tables, then wait for the DE tables being written."""
    result = score_summaries(*sides, perturbations, genes, names, timings)
    t = time.perf_counter()
    write_csv(result.results, tmp["results.csv"])
    write_csv(result.agg, tmp["agg_results.csv"])
    for done in writes:
        done.result()
    result.timings["write (wait)"] = time.perf_counter() - t
    return result
