"""Build the single-file HTML report of a benchmark directory written by ``vcell bench``.

Inputs (paths in ``bench.json`` are relative to the benchmark directory unless absolute):

* ``bench.json``: ``data``, ``pert_col``, ``control``, ``context_col``, ``models``, ``contexts``,
  ``runs`` (``model``, ``context``, ``slug``, ``prediction``, ``eval_dir``), ``real``
  (context -> real ``.h5ad``), ``seed``, ``split``, ``timings``; optional ``baseline``
  (default ``cell_mean``) and ``created``.
* ``leaderboard.csv``: ``model``, ``context``, one column per metric (mean over
  perturbations), ``vcc_score``, ``vcc_score_unclipped``; context ``mean`` rows average the
  held-out contexts.
* per run: the prediction ``.h5ad`` and ``<eval_dir>/results.csv``.

Only ``bench.json`` and ``leaderboard.csv`` are required; a missing or unreadable prediction,
real file or results table leaves a visible warning in its section instead of stopping the
report.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import vcell
from vcell.data.io import atomic_path, read_h5ad
from vcell.errors import VcellError
from vcell.report import figures as F
from vcell.report.html import definition_list, esc, figure, fmt_number, is_null, page, simple_table, tag

log = logging.getLogger(__name__)

__all__ = ["Bench", "build_report", "load_bench"]

MEAN_CONTEXT = "mean"
SCORE = "vcc_score"
SCORE_UNCLIPPED = "vcc_score_unclipped"
#: The three metrics of the Virtual Cell Challenge 2025 score, shown first.
VCC_METRICS = ("overlap_at_N", "mae", "discrimination_score_l1")
#: The scatter shows this many perturbations per context (largest real effect norm).
TOP_PERTURBATIONS = 4
#: The discrimination heatmap shows at most this many perturbations (largest real effects).
MAX_DISCRIMINATION = 50
OVERLAP_METRIC = "overlap_at_N"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
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
        return next((r for r in self.runs if r.model == model and r.context == context), None)


def _resolve(root: Path, value) -> Path | None:
    if value is None or value == "":
        return None
    path = Path(str(value))
    return path if path.is_absolute() else root / path


def _unique(items) -> list[str]:
    return list(dict.fromkeys(str(i) for i in items))


def load_bench(bench_dir: str | os.PathLike) -> Bench:
    """Read ``bench.json`` and ``leaderboard.csv``; one-line :class:`VcellError` on problems."""
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
        raise VcellError(f"{lb_path}: missing column(s) {', '.join(missing)}")
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


def _direction(column: str) -> float | None:
    """Best value of a column: 1.0 (higher is better), 0.0 (lower is better) or None."""
    from vcell.eval.metrics import REGISTRY

    if column.startswith(SCORE):
        return 1.0
    metric = REGISTRY.get(column)
    return None if metric is None else metric.best


def _direction_text(column: str) -> str:
    best = _direction(column)
    return {1.0: "higher is better", 0.0: "lower is better"}.get(best, "")


# --------------------------------------------------------------------------------------------
# Effects (pseudobulk differences) of one context
# --------------------------------------------------------------------------------------------


@dataclass
class ContextEffects:
    """Real and predicted effects of one held-out context (rows: ``perts``, columns: ``genes``)."""

    perts: np.ndarray
    genes: np.ndarray
    real: np.ndarray | None = None
    pred: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _subset_context(adata, bench: Bench, context: str):
    col = bench.context_col
    if col and col in adata.obs.columns:
        labels = adata.obs[col].astype(str)
        if (labels == context).any() and (labels != context).any():
            return adata[(labels == context).to_numpy()].copy()
    return adata


def _context_effects(bench: Bench, context: str) -> ContextEffects:
    from vcell.eval.metrics import ExpressionData

    effects = ContextEffects(perts=np.array([], dtype=str), genes=np.array([], dtype=str))
    real_path = bench.real.get(context)
    if real_path is None:
        effects.warnings.append(f"bench.json names no real data for context {context}")
        return effects
    try:
        real = _subset_context(read_h5ad(real_path), bench, context)
    except VcellError as exc:
        effects.warnings.append(str(exc))
        return effects
    for model in bench.models:
        run = bench.run(model, context)
        if run is None or run.prediction is None:
            effects.warnings.append(f"no prediction of model {model} for context {context} in bench.json")
            continue
        try:
            pred = _subset_context(read_h5ad(run.prediction), bench, context)
            if set(pred.var_names) == set(real.var_names) and not pred.var_names.equals(real.var_names):
                pred = pred[:, real.var_names].copy()
            data = ExpressionData.from_anndata(real, pred, pert_col=bench.pert_col, control=bench.control, energy=False)
        except VcellError as exc:
            effects.warnings.append(f"{model}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a bad file costs its panels, not the report
            effects.warnings.append(f"{model}: {run.prediction}: {type(exc).__name__}: {exc}")
            continue
        if effects.real is None:
            effects.perts, effects.genes, effects.real = data.perturbations, data.genes, data.real_effect
        elif not np.array_equal(data.perturbations, effects.perts):
            effects.warnings.append(f"{model}: the prediction's perturbations differ from the other models'; left out")
            continue
        effects.pred[model] = data.pred_effect
    return effects


def discrimination_panel(
    effects: ContextEffects, model: str, max_perts: int = MAX_DISCRIMINATION
) -> tuple[np.ndarray, list[str], list[int]]:
    """(distances among the shown perturbations, their names, 1-based rank of each row's correct
    perturbation among *all* perturbations, as ``discrimination_score_l1`` ranks it:
    ``score = 1 - (rank - 1) / n``)."""
    real, pred, perts = effects.real, effects.pred[model], effects.perts
    n = perts.size
    shown = np.arange(n)
    if n > max_perts:
        norms = np.linalg.norm(real, axis=1)
        shown = np.sort(np.argsort(-norms, kind="stable")[:max_perts])
    full_rows = F.discrimination_distances(real, pred[shown], perts[shown], effects.genes)  # [shown, all]
    ranks = [int(np.flatnonzero(np.argsort(row) == t)[0]) + 1 for row, t in zip(full_rows, shown)]
    return full_rows[:, shown], [str(p) for p in perts[shown]], ranks


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _warnings(items: Sequence[str]) -> str:
    return "".join(f'<p class="warn">{esc(w)}</p>' for w in items)


def _header(bench: Bench, title: str) -> str:
    meta = bench.meta
    split = meta.get("split", "–")
    if not isinstance(split, str):
        split = json.dumps(split, sort_keys=True)
    items = [
        ("Data", str(meta.get("data", "–"))),
        ("Split", split),
        ("Held-out contexts", ", ".join(bench.contexts) or "–"),
        ("Models", ", ".join(bench.models) or "–"),
        ("Perturbation column", bench.pert_col),
        ("Control label", bench.control),
        ("Context column", bench.context_col or "–"),
        ("Seed", str(meta.get("seed", "–"))),
        ("Baseline (score = 0)", str(meta.get("baseline", "cell_mean"))),
        ("Benchmark directory", bench.root.name),
    ]
    if meta.get("created"):
        items.append(("Benchmark run", str(meta["created"])))
    items += [
        ("Report generated", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("vcell version", vcell.__version__),
    ]
    return (
        f'<header class="top"><h1>{esc(title)}</h1>'
        f'<p class="subtitle">Perturbation-response prediction in held-out cell contexts: '
        f"how close each model's predicted expression changes are to the measured ones.</p>"
        f"{definition_list(items)}</header>"
    )


def _headline(bench: Bench) -> str:
    lb = bench.leaderboard
    if SCORE not in lb.columns:
        return ""
    rows = lb[lb["context"] == MEAN_CONTEXT]
    where = f"mean over {len(bench.contexts)} held-out context(s)"
    if rows.empty:
        rows, where = lb, "single run"
    values = rows[SCORE].astype("float64").to_numpy(na_value=np.nan)
    if not np.isfinite(values).any():
        return ""
    best = rows.iloc[int(np.nanargmax(values))]
    unclipped = f" (unclipped {fmt_number(best[SCORE_UNCLIPPED])})" if SCORE_UNCLIPPED in rows.columns else ""
    baseline = esc(bench.meta.get("baseline", "cell_mean"))
    return (
        f'<div class="headline">Best model ({esc(where)}): <b>{esc(best["model"])}</b>, '
        f"VCC score <b>{esc(fmt_number(best[SCORE]))}</b>{esc(unclipped)}. "
        f"0 = as good as the {baseline} baseline, 100 = perfect (scores are x100, as on the VCC leaderboard).</div>"
    )


def _ordered_columns(bench: Bench, columns: Sequence[str]) -> list[str]:
    first = [c for c in (SCORE, SCORE_UNCLIPPED) if c in columns]
    return first + [c for c in columns if c not in first]


def leaderboard_table(bench: Bench, columns: Sequence[str]) -> str:
    """Leaderboard rows grouped by context (the mean first), sorted by VCC score; in each group
    the best value of each column with a known direction is highlighted."""
    lb = bench.leaderboard
    columns = _ordered_columns(bench, [c for c in columns if c in lb.columns])
    head = ['<th class="text">model</th>']
    for c in columns:
        hint = _direction_text(c)
        arrow = {"higher is better": "↑ higher is better", "lower is better": "↓ lower is better"}.get(hint, "")
        head.append(f"<th>{esc(c)}" + (f'<span class="dir">{esc(arrow)}</span>' if arrow else "") + "</th>")
    contexts = [c for c in [MEAN_CONTEXT, *bench.contexts] if (lb["context"] == c).any()]
    contexts += [c for c in _unique(lb["context"]) if c not in contexts]
    body = []
    for context in contexts:
        group = lb[lb["context"] == context]
        if SCORE in group.columns:
            order = np.argsort(-group[SCORE].astype("float64").to_numpy(na_value=-np.inf), kind="stable")
            group = group.iloc[order]
        label = f"{context} (average over held-out contexts)" if context == MEAN_CONTEXT else f"held-out context: {context}"
        body.append(f'<tr class="group"><th colspan="{len(columns) + 1}">{esc(label)}</th></tr>')
        best = {}
        for c in columns:
            values = group[c].astype("float64").to_numpy(na_value=np.nan)
            direction = _direction(c)
            finite = values[np.isfinite(values)]
            if direction is None or finite.size < 2 or np.all(finite == finite[0]):
                continue  # nothing to compare, or a tie across every model
            target = np.nanmax(values) if direction == 1.0 else np.nanmin(values)
            best[c] = target
        for _, row in group.iterrows():
            cells = [tag("td", esc(row["model"]), class_="text")]
            for c in columns:
                v = row[c]
                null = is_null(v) if v is not pd.NA else True
                cls = "null" if null else ("best" if c in best and float(v) == best[c] else None)
                title = None if null else repr(float(v))
                cells.append(tag("td", esc(fmt_number(None if v is pd.NA else v)), class_=cls, title=title))
            body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="scroll"><table><thead><tr>' + "".join(head) + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"
    )


def _leaderboard_section(bench: Bench) -> str:
    lb = bench.leaderboard
    baseline = esc(bench.meta.get("baseline", "cell_mean"))
    key = [c for c in (SCORE, SCORE_UNCLIPPED, *VCC_METRICS) if c in lb.columns]
    note = (
        f'<p class="note">The <b>VCC score</b> (Virtual Cell Challenge 2025) scales each metric against the '
        f"<b>{baseline}</b> baseline evaluated on the same context: 1 − model/baseline for errors, "
        f"(model − baseline)/(1 − baseline) for agreement scores, then averages over metrics; "
        f"0 = no better than {baseline}, 100 = perfect (x100, as on the VCC leaderboard). <b>vcc_score</b> clips each scaled metric at 0 as the "
        f"challenge leaderboard did; <b>vcc_score_unclipped</b> keeps negative values, showing how much "
        f"worse than the baseline a model is. Both are shown. Metric values are means over perturbations. "
        f"The best value of each column within a context is <span style=\"background:#d7f0d2\"><b>highlighted</b></span>; "
        f"hover a cell for its full precision; – = no value.</p>"
    )
    parts = ['<section id="leaderboard"><h2>Leaderboard</h2>', _headline(bench), note]
    if key:
        parts.append("<h3>VCC score and its three metrics</h3>" + leaderboard_table(bench, key))
    parts.append("<h3>All metrics</h3>" + leaderboard_table(bench, bench.metric_columns))
    parts.append("</section>")
    return "".join(parts)


def _bars_section(bench: Bench, colors) -> tuple[str, int]:
    lb = bench.leaderboard
    columns = _ordered_columns(bench, bench.metric_columns)
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(lb[c])]
    key = [c for c in numeric if c in (SCORE, SCORE_UNCLIPPED, *VCC_METRICS)]
    rest = [c for c in numeric if c not in key]
    contexts = [c for c in bench.contexts if (lb["context"] == c).any()]
    if (lb["context"] == MEAN_CONTEXT).any():
        contexts.append(MEAN_CONTEXT)
    models = [m for m in bench.models if (lb["model"] == m).any()]
    parts = ['<section id="metrics"><h2>Metrics by model and context</h2>',
             '<p class="note">One panel per metric: bars are models, groups are held-out contexts '
             f'({esc(MEAN_CONTEXT)} = average over contexts). Each value is the mean over perturbations.</p>']  # fmt: skip
    n = 0
    for title, cols in (("VCC score and its metrics", key), ("Other metrics", rest)):
        if not cols or not contexts or not models:
            continue
        values = {}
        for c in cols:
            v = {}
            for _, row in lb.iterrows():
                x = row[c]
                v[(row["model"], row["context"])] = math.nan if x is pd.NA or x is None else float(x)
            values[c] = v
        fig = F.metric_bars_figure(values, models, contexts, {c: _direction_text(c) for c in cols}, colors)
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(_img(fig, f"{title}: bar charts by model and context", ""))
        n += 1
    parts.append("</section>")
    return "".join(parts), n


def _img(fig, alt: str, caption: str) -> str:
    return figure(F.png_data_uri(fig), alt, caption)


def _scatter_section(bench: Bench, all_effects: dict[str, ContextEffects], colors) -> tuple[str, int]:
    parts = ['<section id="effects"><h2>Predicted vs real effects</h2>',
             '<p class="note">Effect of a perturbation on a gene = mean log1p expression of the perturbed cells '
             "minus that of the control cells of the same context (pseudobulk difference). Each point is a gene; "
             "the dashed line is y = x; r is the Pearson correlation over all genes (the per-perturbation "
             f"<code>pearson_delta</code>). Shown: the {TOP_PERTURBATIONS} perturbations with the largest real "
             "effect (Euclidean norm) in each held-out context; rows are perturbations, columns are models. "
             "A model predicting no change (e.g. the control mean) has a constant effect and no r.</p>"]  # fmt: skip
    n = 0
    for context in bench.contexts:
        effects = all_effects[context]
        parts.append(f"<h3>{esc(context)}</h3>")
        parts.append(_warnings(effects.warnings))
        if effects.real is None or not effects.pred:
            continue
        norms = np.linalg.norm(effects.real, axis=1)
        top = np.argsort(-norms, kind="stable")[:TOP_PERTURBATIONS]
        real = {str(effects.perts[i]): effects.real[i] for i in top}
        pred = {m: {str(effects.perts[i]): e[i] for i in top} for m, e in effects.pred.items()}
        models = [m for m in bench.models if m in effects.pred]
        fig, rs = F.effect_scatter_figure(effects.genes, real, pred, models, colors, context, seed=int(bench.meta.get("seed", 0) or 0))
        caption = (
            f"Columns: the {len(real)} perturbations with the largest real effect in {esc(context)} "
            "(real effect norm: " + ", ".join(f"{esc(p)} {norms[i]:.2f}" for p, i in zip(real, top)) + "); rows: models."
        )
        parts.append(_img(fig, f"{context}: predicted vs real effect scatter plots", caption))
        table_rows = [(m, *[rs[(p, m)] for p in real]) for m in models]
        parts.append(simple_table(["Pearson r (pearson_delta)", *real], table_rows))
        n += 1
    parts.append("</section>")
    return "".join(parts), n


def _discrimination_section(bench: Bench, all_effects: dict[str, ContextEffects]) -> tuple[str, int]:
    parts = ['<section id="discrimination"><h2>Perturbation discrimination</h2>',
             '<p class="note">Can each prediction be told apart from the other perturbations? For every model and '
             "context: L1 distance between the predicted effect of a perturbation (rows) and the real effect of "
             "every perturbation (columns), the perturbed gene itself left out (as in "
             "<code>discrimination_score_l1</code>). The outlined diagonal is the correct perturbation. Numbers "
             "in the cells are the rank of each column within its row (1 = nearest); the rank of the correct "
             "perturbation is in brackets after each row name (among all perturbations); "
             "discrimination_score_l1 = 1 − (rank − 1) / number of perturbations.</p>"]  # fmt: skip
    n = 0
    for context in bench.contexts:
        effects = all_effects[context]
        parts.append(f"<h3>{esc(context)}</h3>")
        if effects.real is None or not effects.pred:
            parts.append(_warnings([f"no effects available for {context}"]))
            continue
        panels = {m: discrimination_panel(effects, m) for m in bench.models if m in effects.pred}
        fig = F.discrimination_figure(panels, context, effects.perts.size)
        summary = "; ".join(
            f"{esc(m)}: mean rank {np.mean(r):.2f}, score {1 - (np.mean(r) - 1) / effects.perts.size:.3f}"
            for m, (_, _, r) in panels.items()
        )
        parts.append(_img(fig, f"{context}: perturbation discrimination heatmaps", summary))
        n += 1
    parts.append("</section>")
    return "".join(parts), n


def _read_results(bench: Bench, run: Run | None) -> tuple[pd.DataFrame | None, str | None]:
    from vcell.eval.scoring import read_csv

    if run is None or run.eval_dir is None:
        return None, "no eval directory in bench.json"
    path = run.eval_dir / "results.csv"
    if not path.is_file():
        return None, f"{_rel(bench, path)}: not found"
    try:
        return read_csv(path), None
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes a visible warning
        return None, f"{_rel(bench, path)}: unreadable ({type(exc).__name__}: {exc})"


def _overlap_section(bench: Bench, colors) -> tuple[str, int]:
    parts = ['<section id="de-overlap"><h2>DE overlap per perturbation</h2>',
             f'<p class="note"><code>{OVERLAP_METRIC}</code>: for each perturbation, the fraction of its N real '
             "differentially expressed genes (FDR &lt; 0.05 against the controls, N = their number) found among the "
             "top N predicted DE genes (both ranked by |log2 fold change|); 1 = all recovered. Values are from each "
             "run's <code>results.csv</code>. As in cell-eval, a perturbation without real DE genes scores 0; "
             "null values, if any, are not drawn.</p>"]  # fmt: skip
    per_context: dict[str, dict[str, dict[str, float]]] = {}
    n_real_de: dict[str, dict[str, float]] = {}
    warnings = []
    for context in bench.contexts:
        for model in bench.models:
            results, problem = _read_results(bench, bench.run(model, context))
            if results is None:
                warnings.append(f"{model} / {context}: {problem}")
                continue
            if OVERLAP_METRIC not in results.columns or "perturbation" not in results.columns:
                warnings.append(f"{model} / {context}: results.csv has no {OVERLAP_METRIC} column")
                continue
            values = {}
            for pert, v in zip(results["perturbation"], results[OVERLAP_METRIC]):
                if v is not pd.NA and v is not None and np.isfinite(float(v)):
                    values[str(pert)] = float(v)
            per_context.setdefault(context, {})[model] = values
            if "de_nsig_counts_real" in results.columns:
                for pert, v in zip(results["perturbation"], results["de_nsig_counts_real"]):
                    if v is not pd.NA and v is not None and np.isfinite(float(v)):
                        n_real_de.setdefault(context, {})[str(pert)] = float(v)
    parts.append(_warnings(warnings))
    n = 0
    if per_context:
        models = [m for m in bench.models if any(m in v for v in per_context.values())]
        subtitles, notes = {}, []
        for context, counts in n_real_de.items():
            with_de = sum(v > 0 for v in counts.values())
            subtitles[context] = f"{with_de} of {len(counts)} perturbations have real DE genes (FDR < 0.05)"
            if with_de == 0:
                notes.append(
                    f"{context}: no perturbation has a significant real DE gene, so {OVERLAP_METRIC} is 0 for every "
                    "model by construction: the data cannot rank the models on this metric."
                )
        fig = F.overlap_figure(per_context, models, colors, OVERLAP_METRIC, subtitles)
        caption = " ".join(esc(n) for n in notes)
        parts.append(_img(fig, "DE overlap per perturbation", caption))
        n = 1
    parts.append("</section>")
    return "".join(parts), n


def _details_section(bench: Bench) -> str:
    from vcell.eval.metrics import REGISTRY

    parts = ['<section id="details"><h2>Metrics glossary and run details</h2>']
    rows = []
    for c in _ordered_columns(bench, bench.metric_columns):
        if c == SCORE:
            desc = "VCC score: mean of the baseline-scaled metrics, each clipped at 0"
        elif c == SCORE_UNCLIPPED:
            desc = "VCC score without the clip at 0"
        elif c in REGISTRY:
            desc = REGISTRY[c].description
        elif c.startswith("de_nsig_counts_"):
            desc = f"number of significant DE genes ({c.rsplit('_', 1)[-1]})"
        else:
            desc = ""
        rows.append((c, _direction_text(c) or "–", desc))
    parts.append(simple_table(["metric", "direction", "meaning"], rows, text_cols=3))
    runs = [(r.model, r.context, r.slug, _rel(bench, r.prediction), _rel(bench, r.eval_dir)) for r in bench.runs]
    if runs:
        parts.append("<h3>Runs</h3>" + simple_table(["model", "context", "slug", "prediction", "evaluation"], runs, text_cols=5))
    timings = bench.meta.get("timings")
    if isinstance(timings, dict) and timings:
        parts.append("<h3>Timings (seconds)</h3>" + _timings_table(timings))
    parts.append("</section>")
    return "".join(parts)


def _rel(bench: Bench, path: Path | None) -> str:
    if path is None:
        return "–"
    try:
        return str(path.relative_to(bench.root))
    except ValueError:
        return str(path)


def _timings_table(timings: dict) -> str:
    nested = {k: v for k, v in timings.items() if isinstance(v, dict)}
    flat = {k: v for k, v in timings.items() if not isinstance(v, dict)}
    out = []
    if flat:
        out.append(simple_table(["step", "seconds"], [(k, _num(v)) for k, v in flat.items()]))
    if nested:
        keys = _unique(k for v in nested.values() for k in v)
        rows = [(name, *[_num(v.get(k)) for k in keys]) for name, v in nested.items()]
        out.append(simple_table(["run", *keys], rows))
    return "".join(out)


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return "–" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def render_report(bench: Bench, title: str | None = None) -> tuple[str, int]:
    """The report's HTML and its number of embedded images."""
    data = bench.meta.get("data")
    title = title or f"vcell benchmark report: {Path(str(data)).stem if data else bench.root.name}"
    colors = F.model_colors(bench.models)
    effects = {c: _context_effects(bench, c) for c in bench.contexts}
    root = f"{bench.root}{os.sep}"
    for e in effects.values():  # paths inside the bench directory are shown relative to it
        e.warnings = [w.replace(root, "") for w in e.warnings]
    toc = (
        '<nav class="toc">'
        + "".join(
            f'<a href="#{a}">{esc(t)}</a>'
            for a, t in (
                ("leaderboard", "Leaderboard"),
                ("metrics", "Metrics"),
                ("effects", "Predicted vs real"),
                ("discrimination", "Discrimination"),
                ("de-overlap", "DE overlap"),
                ("details", "Glossary & runs"),
            )
        )
        + "</nav>"
    )
    sections = [_header(bench, title), toc, _leaderboard_section(bench)]
    n_images = 0
    with F.style():
        for html_part, n in (
            _bars_section(bench, colors),
            _scatter_section(bench, effects, colors),
            _discrimination_section(bench, effects),
            _overlap_section(bench, colors),
        ):
            sections.append(html_part)
            n_images += n
    sections.append(_details_section(bench))
    sections.append(
        f"<footer>Generated by vcell {esc(vcell.__version__)}. Self-contained file: every figure is embedded; "
        "nothing is loaded from the network or from disk.</footer>"
    )
    return page(title, "\n".join(sections)), n_images


def build_report(bench_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Write a self-contained HTML report of the benchmark in ``bench_dir``.

    ``out`` defaults to ``bench_dir/report.html``; the file is written atomically. Returns its
    path. Raises :class:`VcellError` when ``bench.json`` or ``leaderboard.csv`` is missing or
    unreadable; missing per-run files become warnings inside the report.
    """
    bench = load_bench(bench_dir)
    text, _ = render_report(bench, title)
    out = Path(out) if out is not None else bench.root / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("report written to %s", out)
    return out
