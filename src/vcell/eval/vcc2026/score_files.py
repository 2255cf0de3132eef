"""``vcell eval score --profile vcc2026``: a run folder placed on the scale of a folder of scale ends.

:func:`score` reads what ``vcell eval run`` and ``vcell eval baseline`` wrote (one folder per
context, or the folder itself for a single context) and gives the score table of
:mod:`vcell.eval.vcc2026.scale`; :func:`score_value` is its headline number.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from vcell.data.io import check_output_path
from vcell.errors import VcellError, preview
from vcell.eval.csvio import read_csv, write_csv
from vcell.eval.vcc2026.anchor import N_SPLITS
from vcell.eval.vcc2026.scale import average_contexts, score_context, standard_errors, unresolved, unresolved_note
from vcell.eval.vcc2026.tables import agg_means

log = logging.getLogger(__name__)


def _context_dirs(root: Path, marker: str) -> dict[str, Path]:
    """context -> folder holding ``marker`` ('' for a single context at ``root``)."""
    if (root / marker).is_file():
        return {"": root}
    found = {p.parent.name: p.parent for p in sorted(root.glob(f"*/{marker}"))}
    if not found:
        peer = "baseline_agg.csv" if marker.startswith("baseline_") else None
        hint = ("; it holds cell-eval2's baseline files, which vcell does not read: build the scale with "
                "`vcell eval baseline --profile vcc2026 --real REAL --out DIR` (the same numbers)"
                if peer and ((root / peer).is_file() or any(root.glob(f"*/{peer}"))) else "")
        raise VcellError(f"{root}: no {marker} here or in its context folders{hint}")
    return found


def _mean_row(path: Path) -> dict[str, float]:
    return agg_means(read_csv(path))


def _n_splits(folder: Path) -> int:
    """The anchor's number of splits, from the ``scale.json`` beside it (cell-eval2's 5 when it says nothing)."""
    try:
        return int(json.loads((folder / "scale.json").read_text())["anchor"]["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return N_SPLITS


def _perturbations(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return set(read_csv(path, text_columns=("perturbation", "metric"))["perturbation"].astype(str))


def _same_perturbations(run: Path, baseline: Path) -> None:
    """Refuse a run and a scale made from different references: their perturbations differ (a
    scale's ends are only meaningful for the perturbations and cells they were built from)."""
    user, ends = _perturbations(run), _perturbations(baseline)
    if user is None or ends is None or user == ends:
        return
    only_run, only_scale = sorted(user - ends), sorted(ends - user)
    parts = ([f"{len(only_run)} only in the run ({preview(only_run, 3)})"] if only_run else []) + \
            ([f"{len(only_scale)} only in the scale ({preview(only_scale, 3)})"] if only_scale else [])
    raise VcellError(f"{run}: scored on {len(user)} perturbations, the scale {baseline.parent} on {len(ends)}: "
                     f"{'; '.join(parts)}; build the scale from the reference the run was scored against")


def score(user, scale_dir, out=None, overwrite: bool = False) -> pd.DataFrame:
    """The scaled 2026 score of a run folder against a folder of scale ends, per context and averaged."""
    user, scale_dir = Path(user), Path(scale_dir)
    if out is not None:
        check_output_path(out, overwrite=overwrite)
    if not user.exists():
        raise VcellError(f"{user}: not found")
    users = _context_dirs(user, "agg_results.csv") if user.is_dir() else {"": user}
    if scale_dir.is_file():
        raise VcellError(f"{scale_dir}: a file; --baseline takes the folder `vcell eval baseline --profile vcc2026` wrote "
                         f"({scale_dir.parent})")
    ends = _context_dirs(scale_dir, "baseline_agg_results.csv")
    missing = sorted(set(users) - set(ends))
    if missing:
        hint = ""
        if set(ends) == {""}:  # one context scaled: the user's folders are predictions of a several-prediction run
            hint = f"; a folder of several predictions' runs? score one of them: --user {user / missing[0]}"
        raise VcellError(f"{scale_dir}: no scale for context(s) {preview(missing, 3)} of {user}{hint}")
    tables = {}
    for ctx, folder in users.items():
        if folder.is_dir():
            _same_perturbations(folder / "results.csv", ends[ctx] / "baseline_results.csv")
        u = _mean_row(folder / "agg_results.csv" if folder.is_dir() else folder)
        b = _mean_row(ends[ctx] / "baseline_agg_results.csv")
        anchor_path = ends[ctx] / "anchor_agg.csv"
        r = None
        if anchor_path.is_file():
            a = read_csv(anchor_path, text_columns=("metric", "estimator"))
            r = {str(m): float(v) for m, v in zip(a["metric"], a["replicate"])}
            if "replicate_sd" in a.columns:
                if flagged := unresolved(b, r, standard_errors(a, _n_splits(ends[ctx]))):
                    log.warning("%s: %s", anchor_path, unresolved_note(flagged))
        tables[ctx] = score_context(u, b, r)
    table = average_contexts(tables)
    if out is not None:
        write_csv(table, out)
    return table


def score_value(table: pd.DataFrame) -> float:
    """The headline number of a score table: the mean over contexts of the context scores."""
    rows = table[(table["metric"] == "avg_score")]
    final = rows[rows["context"] == "mean"] if (rows["context"] == "mean").any() else rows
    return float(final["score"].iloc[0]) if len(final) else math.nan
