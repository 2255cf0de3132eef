"""Read a benchmark directory written by ``vcell bench``: :func:`load_bench` and :class:`Bench`.

Inputs (paths in ``bench.json`` are relative to the benchmark directory unless absolute):

* ``bench.json``: ``data``, ``pert_col``, ``control``, ``context_col``, ``models``, ``contexts``,
  ``runs`` (``model``, ``context``, ``slug``, ``prediction``, ``eval_dir``), ``real``
  (context -> real ``.h5ad``), ``seed``, ``split``, ``timings``; optional ``baseline``
  (default ``cell_mean``), ``created``, ``profile``, ``model_options``, ``folds`` (each with
  ``held_out_contexts`` and ``held_out_perturbations``) and the ``vcc2026_*`` caveats.
* ``leaderboard.csv``: ``model``, ``context``, one column per metric (mean over
  perturbations), ``vcc_score``, ``vcc_score_unclipped``; context ``mean`` rows average the
  held-out contexts.
* per run: the prediction ``.h5ad`` and ``<eval_dir>/results.csv``.

Only ``bench.json`` and ``leaderboard.csv`` are required; a missing or unreadable prediction,
real file or results table leaves a visible warning in its section instead of stopping the
report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vcell.errors import VcellError, preview

__all__ = ["MEAN_CONTEXT", "SCORE", "SCORE_UNCLIPPED", "VCC_METRICS", "Bench", "Run", "load_bench"]

MEAN_CONTEXT = "mean"
SCORE = "vcc_score"
SCORE_UNCLIPPED = "vcc_score_unclipped"
#: The three metrics of the Virtual Cell Challenge 2025 score, shown first.
VCC_METRICS = ("overlap_at_N", "mae", "discrimination_score_l1")


@dataclass
class Run:
    """One (model, held-out context) run of the benchmark: its prediction and evaluation folder."""

    model: str
    context: str
    slug: str
    prediction: Path | None
    eval_dir: Path | None


@dataclass
class Bench:
    """What the report reads from a benchmark directory."""

    root: Path
    meta: dict
    leaderboard: pd.DataFrame
    models: list[str]
    contexts: list[str]
    runs: list[Run]
    real: dict[str, Path]
    pert_col: str
    control: str
    context_col: str | None
    metric_columns: list[str] = field(default_factory=list)

    def run(self, model: str, context: str) -> Run | None:
        """The run of ``model`` on ``context``, or None when ``bench.json`` lists none."""
        return next((r for r in self.runs if r.model == model and r.context == context), None)


def _resolve(root: Path, value) -> Path | None:
    if value is None or value == "":
        return None
    path = Path(str(value))
    return path if path.is_absolute() else root / path


def _unique(items) -> list[str]:
    return list(dict.fromkeys(str(i) for i in items))


def load_bench(bench_dir: str | os.PathLike) -> Bench:
    """Read ``bench.json`` and ``leaderboard.csv`` of a benchmark directory.

    Parameters
    ----------
    bench_dir : str or os.PathLike
        A directory written by ``vcell bench``.

    Returns
    -------
    Bench
        What the report needs; per-run files are only located here, not read.

    Raises
    ------
    VcellError
        One line naming the file at fault when the directory, ``bench.json`` or
        ``leaderboard.csv`` is missing or unreadable.
    """
    from vcell.eval.scoring import read_csv

    root = Path(bench_dir)
    if not root.is_dir():
        raise VcellError(f"{root}: benchmark directory not found")
    meta_path = root / "bench.json"
    if not meta_path.is_file():
        raise VcellError(f"{meta_path}: not found; is {root} a directory written by `vcell bench`?")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VcellError(f"{meta_path}: unreadable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise VcellError(f"{meta_path}: expected a JSON object")

    lb_path = root / "leaderboard.csv"
    if not lb_path.is_file():
        raise VcellError(f"{lb_path}: not found; is {root} a directory written by `vcell bench`?")
    try:
        leaderboard = read_csv(lb_path, text_columns=("model", "context"))
    except Exception as exc:  # pandas raises many types; a number column with text: ValueError
        raise VcellError(f"{lb_path}: unreadable leaderboard ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("model", "context") if c not in leaderboard.columns]
    if missing:
        raise VcellError(f"{lb_path}: missing column(s) {preview(missing, quote=False)}")
    leaderboard["model"] = leaderboard["model"].astype(str)
    leaderboard["context"] = leaderboard["context"].astype(str)

    runs = []
    for i, r in enumerate(meta.get("runs") or []):
        if not isinstance(r, dict) or "model" not in r or "context" not in r:
            raise VcellError(f"{meta_path}: runs[{i}] needs 'model' and 'context'")
        runs.append(
            Run(
                model=str(r["model"]),
                context=str(r["context"]),
                slug=str(r.get("slug", f"{r['model']}_{r['context']}")),
                prediction=_resolve(root, r.get("prediction")),
                eval_dir=_resolve(root, r.get("eval_dir")),
            )
        )
    models = _unique(meta.get("models") or [])
    models += [m for m in _unique([r.model for r in runs] + leaderboard["model"].tolist()) if m not in models]
    contexts = _unique(meta.get("contexts") or [])
    extra = _unique([r.context for r in runs] + leaderboard["context"].tolist())
    contexts += [c for c in extra if c not in contexts and c != MEAN_CONTEXT]
    real = {str(k): p for k, v in (meta.get("real") or {}).items() if (p := _resolve(root, v)) is not None}
    metric_columns = [c for c in leaderboard.columns if c not in ("model", "context")]
    return Bench(
        root=root,
        meta=meta,
        leaderboard=leaderboard,
        models=models,
        contexts=contexts,
        runs=runs,
        real=real,
        pert_col=str(meta.get("pert_col", "target_gene")),
        control=str(meta.get("control", "non-targeting")),
        context_col=str(meta["context_col"]) if meta.get("context_col") else None,
        metric_columns=metric_columns,
    )
