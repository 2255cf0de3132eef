"""Resuming an interrupted ``vcell bench`` (``--resume``): the runs it finished, kept, and what a
resumed benchmark must share with them.

A benchmark writes its results into ``OUT/bench.partial`` and records there, each time a model has
been trained, predicted and scored on a fold (a *run* here), what the leaderboard and
``bench.json`` need of it (``resume.json``). If the benchmark stops (a model's error, Ctrl-C, a
kill) the folder stays when it holds a finished run; ``--resume`` reads those back and runs the
rest, so the results are those of an uninterrupted benchmark (``timings`` aside: a kept run's are
its first run's). Once done, the results are put in place and the folder goes
(:func:`vcell.data.staging.staged_folder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell._version import __version__
from vcell.data.io import atomic_path
from vcell.errors import VcellError, preview
from vcell.train.runs import MORE_ROWS, data_difference, data_identity, digest, split_identity

log = logging.getLogger(__name__)

#: The folder inside ``vcell bench --out`` where a benchmark is written until it is done.
PARTIAL = "bench.partial"
RECORD = "resume.json"

#: The options a resumed benchmark must share with its kept runs (each changes their numbers).
FLAGS = {"pert_col": "--pert-col", "control": "--control", "context_col": "--context-col", "batch_col": "--batch-col",
         "expression": "--expression", "dataset_col": "--dataset-col", "datasets": "--dataset", "profile": "--profile",
         "seed": "--seed", "allow_missing_controls": "--allow-missing-controls"}


def bench_settings(data, folds, options: dict) -> dict:
    """What the runs of a benchmark depend on besides each model's options: vcell's version, the
    data (file, cells, genes, labels, values: :func:`~vcell.train.runs.data_identity`; the raw
    counts the 2026 score draws from, which log1p of normalised counts does not tell apart from
    their multiples), ``options`` (the keys of :data:`FLAGS`) and each fold's split."""
    counts = data.adata.layers["counts"] if "counts" in data.adata.layers else None
    return {"vcell_version": __version__, "options": {k: options[k] for k in FLAGS}, "data": data_identity(data),
            "counts": None if counts is None else _counts_digest(counts),
            "folds": [{"name": f.name, **split_identity(data.index, f.split)} for f in folds]}


def _counts_digest(counts) -> str:
    """A digest of every cell's total and of rows spread over a counts matrix."""
    rows = np.unique(np.linspace(0, max(counts.shape[0] - 1, 0), min(MORE_ROWS, counts.shape[0])).astype(np.int64))
    block = counts[rows]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return digest(np.asarray(counts.sum(axis=1), np.float64).ravel(), np.asarray(block, np.float32))


def finished_runs(out: str | Path) -> int | None:
    """How many finished runs ``out``'s :data:`PARTIAL` keeps (``None``: there is no such folder; 0:
    none, or no record of any; -1: a record that cannot be read)."""
    folder = Path(out) / PARTIAL
    if not folder.is_dir():
        return None
    if not (folder / RECORD).is_file():
        return 0
    try:
        record = json.loads((folder / RECORD).read_text())
        if not all(isinstance(record[k], dict) for k in ("settings", "folds", "runs")):
            return -1
        return len(record["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def check_partial(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Before any work: refuse ``--resume`` with nothing to resume, and a new benchmark over kept runs
    unless ``overwrite`` (which discards them); a folder keeping none is removed."""
    kept = finished_runs(out)
    folder = Path(out) / PARTIAL
    if kept == -1 and not (overwrite and not resume):
        raise VcellError(f"{folder / RECORD}: cannot be read (written by another vcell version?); --overwrite without "
                         f"--resume discards {folder} and starts again")
    if kept == 0:  # a killed benchmark's, from before its first finished run: nothing in it to keep
        shutil.rmtree(folder)
        log.warning("removed %s, left by an interrupted benchmark with no record of a finished run", folder)
    if resume and not kept:
        raise VcellError(f"{out}: nothing to resume (no finished runs of an interrupted benchmark in {folder})")
    if kept and not resume:
        if not overwrite:
            raise VcellError(f"{folder} keeps {kept} finished run(s) (a model on a fold) of an interrupted benchmark: "
                             "--resume continues it, --overwrite discards them and starts again")
        shutil.rmtree(folder)
        log.warning("%s: discarded %s of an interrupted benchmark (--overwrite)", folder,
                    f"{kept} finished run(s)" if kept > 0 else "the unreadable record")


class Records:
    """The runs a benchmark has finished, in ``stage/resume.json``.

    Parameters
    ----------
    stage : Path
        The benchmark's :data:`PARTIAL` folder.
    settings : dict
        This benchmark's :func:`bench_settings`.
    resume : bool
        Continue from the runs the folder keeps: refused, naming each difference, when they were
        made with other settings or other options of their model.
    model_options : dict
        Model name -> the options it is built with.
    """

    def __init__(self, stage: Path, settings: dict, resume: bool, model_options: dict[str, dict]):
        self.stage, self.path = stage, stage / RECORD
        settings, options = _read_back(settings), _read_back(model_options)  # compared as read back from JSON
        self.model_options = options
        self.state = {"settings": settings, "folds": {}, "runs": {}}
        self.kept: list[str] = []  # "model on fold FOLD" of each run read back (bench.json's resumed_runs)
        if resume:
            saved = json.loads(self.path.read_text())
            diffs = _differences(saved["settings"], settings)
            for run in saved["runs"].values():
                model = run["model"]
                if model in options and run["options"] != options[model]:
                    diffs.append(f"its {model} was run with options {run['options']}, not {options[model]}")
            if diffs:
                raise VcellError(f"cannot resume {stage}: " + "; ".join(dict.fromkeys(diffs)) + "; resume with the same data "
                                 "and options, or pass --overwrite to discard its runs and start again")
            self.state = {**saved, "settings": settings}
            log.info("resuming %s: %d run(s) finished earlier are kept", stage, sum(r["model"] in options for r in saved["runs"].values()))
        self._said: set[str] = set()

    def fold(self, fold: str) -> dict | None:
        """What was recorded of ``fold`` itself (:meth:`add_fold`), if it was and its ``files`` are there."""
        record = self.state["folds"].get(fold)
        if record is None or not self._there(record.get("files", []), f"fold {fold}"):
            return None
        return record

    def run(self, fold: str, model: str) -> dict | None:
        """The finished run of ``model`` on ``fold``, if there is one and its files are there: as given
        to :meth:`add_run`, its ``aggs`` read back as ``{context: DataFrame}``."""
        run = self.state["runs"].get(f"{fold}\0{model}")
        if run is None or not self._there([p for r in run["runs"] for p in (r["prediction"], r["eval_dir"])], f"{model} on fold {fold}"):
            return None
        return {**run, "aggs": {ctx: pd.DataFrame(**agg) for ctx, agg in run["aggs"].items()}}

    def _there(self, files: list[str], what: str) -> bool:
        gone = [f for f in files if not (self.stage / f).exists()]
        if gone and what not in self._said:
            self._said.add(what)
            log.warning("%s: %s is gone from %s; computing it again", what, gone[0], self.stage)
        return not gone

    def keep_only(self, models: list[str]) -> None:
        """Forget the kept runs of models not in ``models`` (a resume without them removes their files)."""
        self.state["runs"] = {k: r for k, r in self.state["runs"].items() if r["model"] in models}
        self._save()

    def finish(self) -> None:
        """The benchmark is done: its record goes before its results are put in place (a kill after
        that leaves nothing to resume from a folder whose files went elsewhere)."""
        self.path.unlink(missing_ok=True)

    def add_fold(self, fold: str, record: dict) -> None:
        """Record what a fold computed once for all its runs (e.g. its 2026 scales' caveats)."""
        self.state["folds"][fold] = _read_back(record)
        self._save()

    def add_run(self, fold: str, model: str, record: dict) -> None:
        """Record the finished run of ``model`` on ``fold``: its ``runs``, ``timings``, ``aggs``
        (``{context: DataFrame}``), ``scores_2026`` and ``beyond`` (JSON-able besides ``aggs``)."""
        aggs = {ctx: agg.to_dict(orient="split") for ctx, agg in record["aggs"].items()}
        self.state["runs"][f"{fold}\0{model}"] = _read_back(
            {**record, "aggs": aggs, "model": model, "fold": fold, "options": self.model_options.get(model, {})})
        self._save()

    def _save(self) -> None:
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.state, indent=1))  # NaN as NaN: json reads it back

    @contextlib.contextmanager
    def kept_on_failure(self) -> Iterator[None]:
        """If the body raises, keep the folder when it holds a finished run (and say how to continue),
        else remove it."""
        try:
            yield
        except BaseException as exc:
            kept = len(self.state["runs"])
            if not kept or not self.path.is_file():
                shutil.rmtree(self.stage, ignore_errors=True)
            else:  # Ctrl-C: the command line's own line says it (vcell.cli.interrupts)
                level = logging.DEBUG if isinstance(exc, KeyboardInterrupt) else logging.WARNING
                log.log(level, "kept %d finished run(s) (a model on a fold) in %s: --resume (resume=True in Python) continues "
                        "from them", kept, self.stage)
            raise


def _read_back(value):
    """``value`` as ``resume.json`` gives it back (tuples as lists, numpy numbers and dates as JSON's)."""
    return json.loads(json.dumps(value, default=str))


def _differences(saved: dict, ours: dict) -> list[str]:
    diffs = []
    if saved.get("vcell_version") != ours["vcell_version"]:
        diffs.append(f"it was run by vcell {saved.get('vcell_version')}, this is vcell {ours['vcell_version']}")
    a, b = saved.get("options", {}), ours["options"]
    diffs += [f"it was run with {flag} {a.get(key)!r}, not {b.get(key)!r}" for key, flag in FLAGS.items() if a.get(key) != b.get(key)]
    if not diffs:  # another column or seed reads the data and draws the folds otherwise: that is the difference
        diffs.append(data_difference(saved["data"], ours["data"], done="run"))
        if saved.get("counts") != ours.get("counts") and not diffs[-1]:
            diffs.append(f"the raw counts of {ours['data'].get('file') or 'the data (in memory)'} are not those it was run on")
        if saved["folds"] != ours["folds"]:
            was, now = [f["name"] for f in saved["folds"]], [f["name"] for f in ours["folds"]]
            diffs.append(f"its folds were {preview(was, n=4)}, not {preview(now, n=4)}" if was != now else
                         "its folds held out other cells or perturbations")
    return [d for d in diffs if d]
