"""The report's HTML sections: header, leaderboard, metric bars, effect scatters, perturbation
discrimination, DE overlap, glossary and run details."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

import vcell.report.figures as F
from vcell.report.effects import ContextEffects, discrimination_panel
from vcell.report.header import SCORE_2026, context_label, headline
from vcell.report.html import esc, figure, fmt_number, is_null, simple_table, tag
from vcell.report.inputs import MEAN_CONTEXT, SCORE, SCORE_UNCLIPPED, VCC_METRICS, Bench, Run, _unique
from vcell.report.vcc2026 import GLOSSARY_2026, PREFIX, beyond_replicate_note, scale_caveats_note, short_label, table_note

__all__ = [
    "bars_section",
    "details_section",
    "discrimination_section",
    "leaderboard_section",
    "leaderboard_table",
    "overlap_section",
    "scatter_section",
]

#: The scatter shows this many perturbations per context (largest real effect norm).
TOP_PERTURBATIONS = 4
OVERLAP_METRIC = "overlap_at_N"


def _direction(column: str) -> float | None:
    """Best value of a column: 1.0 (higher is better), 0.0 (lower is better) or None."""
    from vcell.eval.metrics import REGISTRY

    if column.startswith(SCORE) or column.startswith(PREFIX):
        return 1.0  # scores, and the 2026 metrics once scaled (0 = baseline, 1 = replicate)
    metric = REGISTRY.get(column)
    return None if metric is None else metric.best


def _direction_text(column: str) -> str:
    best = _direction(column)
    return {1.0: "higher is better", 0.0: "lower is better"}.get(best, "")


def _warnings(items: Sequence[str]) -> str:
    return "".join(f'<p class="warn">{esc(w)}</p>' for w in items)


def _ordered_columns(bench: Bench, columns: Sequence[str]) -> list[str]:
    first = [c for c in (SCORE, SCORE_UNCLIPPED) if c in columns]
    return first + [c for c in columns if c not in first]


def _contexts(bench: Bench, present) -> list[str]:
    """The contexts to show, the mean first; with one scored context, that context alone (its mean repeats it)."""
    contexts = [c for c in [MEAN_CONTEXT, *bench.contexts] if c in present]
    contexts += [c for c in _unique(present) if c not in contexts]
    if len(bench.contexts) == 1 and bench.contexts[0] in contexts and MEAN_CONTEXT in contexts:
        contexts.remove(MEAN_CONTEXT)
    return contexts


def leaderboard_table(bench: Bench, columns: Sequence[str], short: bool = False) -> str:
    """The leaderboard as an HTML table.

    Parameters
    ----------
    bench : Bench
        The benchmark; its ``leaderboard`` gives the rows.
    columns : sequence of str
        The metric columns to show (those absent from the leaderboard are skipped).
    short : bool
        Headers without the ``vcc2026_`` prefix, wrapped at underscores (the full name on hover).

    Returns
    -------
    str
        Rows grouped by context (the mean first, unless one context is scored), sorted by VCC score
        (the VCC 2026 score in a ``short`` table); in each group the best value of each column with a
        known direction is highlighted.
    """
    lb = bench.leaderboard
    columns = _ordered_columns(bench, [c for c in columns if c in lb.columns])
    head = ['<th class="text">model</th>']
    for c in columns:
        hint = _direction_text(c)
        arrow = {"higher is better": "↑ higher is better", "lower is better": "↓ lower is better"}.get(hint, "")
        label = short_label(c) if short else esc(c)
        opening = f'<th class="wrap" title="{esc(c)}">' if short else "<th>"
        head.append(opening + label + (f'<span class="dir">{esc(arrow)}</span>' if arrow else "") + "</th>")
    body, nulls = [], 0
    key = SCORE_2026 if short and SCORE_2026 in lb.columns else SCORE
    for context in _contexts(bench, _unique(lb["context"])):
        group = lb[lb["context"] == context]
        if key in group.columns:
            order = np.argsort(-group[key].astype("float64").to_numpy(na_value=-np.inf), kind="stable")
            group = group.iloc[order]
        label = f"{context} (average over scored contexts)" if context == MEAN_CONTEXT else context_label(bench, context)
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
                nulls += null
                cells.append(tag("td", esc(fmt_number(None if null else v)), class_=cls, title=title))  # a mean of nothing: –
            body.append("<tr>" + "".join(cells) + "</tr>")
    said = ('<p class="note">– : no value. For a metric averaged over perturbations: undefined (NaN) for at least one '
            "perturbation, which the mean keeps, as cell-eval's does (each run's <code>results.csv</code> holds the "
            "others).</p>") if nulls else ""
    return (
        '<div class="scroll"><table><thead><tr>' + "".join(head) + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>" + said
    )


def leaderboard_section(bench: Bench) -> str:
    """The leaderboard section: best model, how the VCC score is scaled, and the leaderboard tables."""
    lb = bench.leaderboard
    baseline = esc(bench.meta.get("baseline", "cell_mean"))
    key = [c for c in (SCORE, SCORE_UNCLIPPED, *VCC_METRICS) if c in lb.columns]
    note = (
        f'<p class="note">The <b>VCC score</b> (Virtual Cell Challenge 2025) scales each metric against the '
        f"<b>{baseline}</b> baseline evaluated on the same context: 1 − model/baseline for errors, "
        f"(model − baseline)/(1 − baseline) for agreement scores, then averages over metrics; "
        f"0 = no better than {baseline}, 100 = perfect (x100, as on the VCC leaderboard). <b>vcc_score</b> clips each scaled metric at 0 as the "
        f"challenge leaderboard did; <b>vcc_score_unclipped</b> keeps negative values, showing how much "
        f"worse than the baseline a model is. Both are shown.</p>"
    )
    reading = ('<p class="note">Metric values are means over perturbations (the VCC 2026 columns: scaled scores, '
               'from those means). The best value of each column within a context is '
               '<span style="background:#d7f0d2"><b>highlighted</b></span>; hover a cell for its full precision; – = no value.</p>')
    parts = ['<section id="leaderboard"><h2>Leaderboard</h2>', headline(bench), reading]
    key_2026 = [c for c in lb.columns if c.startswith(PREFIX)]
    if key_2026:  # a vcc2026 benchmark: its score first
        key_2026 = [SCORE_2026] + [c for c in key_2026 if c != SCORE_2026]
        parts.append("<h3>VCC 2026 score and its six scaled metrics</h3>" + table_note()
                     + leaderboard_table(bench, key_2026, short=True) + beyond_replicate_note(bench) + scale_caveats_note(bench))
    if key:
        parts.append("<h3>VCC score and its three metrics</h3>" + note + leaderboard_table(bench, key))
    parts.append("<h3>All metrics</h3>" + leaderboard_table(bench, bench.metric_columns))
    parts.append("</section>")
    return "".join(parts)


def bars_section(bench: Bench, colors) -> tuple[str, int]:
    """The per-metric bar charts (models x scored contexts).

    Returns
    -------
    tuple of (str, int)
        The section's HTML and its number of embedded images.
    """
    lb = bench.leaderboard
    columns = _ordered_columns(bench, bench.metric_columns)
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(lb[c])]
    key = [c for c in numeric if c in (SCORE, SCORE_UNCLIPPED, *VCC_METRICS)]
    key_2026 = [c for c in numeric if c == SCORE_2026 or c.startswith(PREFIX)]
    rest = [c for c in numeric if c not in key and c not in key_2026]
    contexts = [c for c in bench.contexts if (lb["context"] == c).any()]
    if (lb["context"] == MEAN_CONTEXT).any() and len(contexts) > 1:  # one context: its mean repeats it
        contexts.append(MEAN_CONTEXT)
    models = [m for m in bench.models if (lb["model"] == m).any()]
    parts = ['<section id="metrics"><h2>Metrics by model and context</h2>',
             '<p class="note">One panel per metric: bars are models, groups are scored contexts '
             f'({esc(MEAN_CONTEXT)} = average over contexts). Each value is the mean over perturbations, except the '
             'scores (VCC, and VCC 2026 with its scaled metrics), computed per context from those means.</p>']  # fmt: skip
    n = 0
    groups = (("VCC 2026 score and its scaled metrics", key_2026), ("VCC score and its metrics", key), ("Other metrics", rest))
    for title, cols in groups:
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


def scatter_section(bench: Bench, all_effects: dict[str, ContextEffects], colors) -> tuple[str, int]:
    """Predicted vs real effect scatter plots of the perturbations with the largest real effects.

    Returns
    -------
    tuple of (str, int)
        The section's HTML and its number of embedded images.
    """
    parts = ['<section id="effects"><h2>Predicted vs real effects</h2>',
             '<p class="note">Effect of a perturbation on a gene = mean log1p expression of the perturbed cells '
             "minus that of the control cells of the same context (pseudobulk difference). Each point is a gene; "
             "the dashed line is y = x; r is the Pearson correlation over all genes (the per-perturbation "
             f"<code>pearson_delta</code>, computed here from the predictions, also for a profile that does not score it). Shown: the {TOP_PERTURBATIONS} perturbations with the largest real "
             "effect (Euclidean norm) in each scored context; columns are perturbations, rows are models. "
             "A model that predicts no change (e.g. control_mean) has no true effect: its predicted effects are the "
             "sampling noise of the control cells it resamples, a cloud around y = 0 that can look as wide as a small "
             "real effect, and its r is near 0 (n/a when the prediction is exactly constant).</p>"]  # fmt: skip
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
        parts.append(simple_table(["Pearson r (as pearson_delta)", *real], table_rows))
        n += 1
    parts.append("</section>")
    return "".join(parts), n


def discrimination_section(bench: Bench, all_effects: dict[str, ContextEffects]) -> tuple[str, int]:
    """The perturbation-discrimination heatmaps of each context.

    Returns
    -------
    tuple of (str, int)
        The section's HTML and its number of embedded images.
    """
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
        n_all = effects.perts.size
        shown = len(next(iter(panels.values()))[1])
        # the heatmaps show the perturbations with the largest real effects; the summary is the run's own metric
        # (every perturbation, as its agg_results.csv) where the leaderboard has it, else the shown rows'
        lb = bench.leaderboard
        scores = {}
        for m, (_, _, r) in panels.items():
            row = lb[(lb["model"] == m) & (lb["context"] == context)]
            value = float(row["discrimination_score_l1"].iloc[0]) if "discrimination_score_l1" in lb.columns and len(row) else math.nan
            over = n_all if math.isfinite(value) else shown  # a profile without the metric: the shown rows' mean
            scores[m] = (value if math.isfinite(value) else 1 - (np.mean(r) - 1) / n_all, over)
        summary = "; ".join(f"{esc(m)}: mean rank {1 + (1 - v) * n_all:.2f}, score {v:.3f}" + (f" (the {k} shown)" if k < n_all else "")
                            for m, (v, k) in scores.items())
        if shown < n_all:
            summary += f" (over all {n_all} perturbations unless said; the heatmaps show the {shown} with the largest real effects)"
        if n_all == 1:  # every model scores 1: the metric cannot tell them apart here
            summary += (". One perturbation: it is the nearest to itself whatever a model predicts, so the score is 1 by "
                        "construction and says nothing of the models here")
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


def overlap_section(bench: Bench, colors) -> tuple[str, int]:
    """DE overlap (``overlap_at_N``) per perturbation, read from each run's ``results.csv``.

    Returns
    -------
    tuple of (str, int)
        The section's HTML and its number of embedded images.
    """
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


def details_section(bench: Bench) -> str:
    """The metrics glossary, the list of runs and the timings of ``bench.json``."""
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
        elif c in GLOSSARY_2026:
            desc = GLOSSARY_2026[c]
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
    kept = bench.meta.get("resumed_runs")
    if isinstance(kept, list) and kept:
        parts.append(f"<p>{len(kept)} run(s) were kept from an interrupted benchmark (<code>vcell bench --resume</code>), "
                     f"their timings those of the interrupted run: {esc(', '.join(map(str, kept)))}.</p>")
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

