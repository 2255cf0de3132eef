"""The report's header: what was run (data, profile, hold-out, models and their options) and the headline."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from vcell._version import __version__
from vcell.report.html import definition_list, esc, fmt_number
from vcell.report.inputs import MEAN_CONTEXT, SCORE, SCORE_UNCLIPPED, Bench, _unique

__all__ = ["SCORE_2026", "context_label", "header_section", "headline", "holdout"]

SCORE_2026 = "vcc2026_score"


def holdout(bench: Bench) -> tuple[list[str], list[str]] | None:
    """The held-out contexts and perturbations of every fold (``bench.json``'s ``folds``), or None
    for a benchmark that did not record them."""
    folds = [f for f in bench.meta.get("folds") or [] if isinstance(f, dict)]
    if not any("held_out_perturbations" in f for f in folds):
        return None
    contexts = _unique(c for f in folds for c in f.get("held_out_contexts") or [])
    perts = _unique(p for f in folds for p in f.get("held_out_perturbations") or [])
    return contexts, perts


def context_label(bench: Bench, context: str) -> str:
    """How a table names a scored context: held out, or only scored (its held-out perturbations)."""
    held = holdout(bench)
    return f"held-out context: {context}" if held is None or context in held[0] else f"context: {context}"


def _subtitle(held: tuple[list[str], list[str]] | None) -> str:
    if held is None:
        what = "in held-out cell contexts"
    else:
        what = {(True, True): "in held-out cell contexts (every perturbation there scored; the held-out perturbations never trained on in any context)",
                (True, False): "in held-out cell contexts",
                (False, True): "for held-out perturbations, never trained on",
                (False, False): "on held-out cells"}[(bool(held[0]), bool(held[1]))]
    return f"Perturbation-response prediction {what}: how close each model's predicted expression changes are to the measured ones."


def _model_options(meta: dict) -> str | None:
    options = meta.get("model_options")
    if not isinstance(options, dict):
        return None
    given = [f"{m}: {json.dumps(o, sort_keys=True)}" for m, o in options.items() if o]
    if not given:
        return "defaults (no --model-config entry)"
    return "; ".join(given + (["other models: defaults"] if len(given) < len(options) else []))


def header_section(bench: Bench, title: str) -> str:
    """The page header: title, what the report shows, and the run's data, split, hold-out, models and versions."""
    meta = bench.meta
    split = meta.get("split", "–")
    if not isinstance(split, str):
        split = json.dumps(split, sort_keys=True)
    held = holdout(bench)
    items = [("Data", str(meta.get("data", "–")))]
    if meta.get("datasets"):  # --dataset: only these datasets' cells of the file
        items.append(("Datasets used", ", ".join(map(str, meta["datasets"]))))
    items.append(("Split", split))
    if held is None:
        items.append(("Held-out contexts", ", ".join(bench.contexts) or "–"))
    else:
        if held[0]:
            items.append(("Held-out contexts", ", ".join(held[0])))
        if held[1]:
            items.append((f"Held-out perturbations ({len(held[1])})", ", ".join(held[1])))
        if set(bench.contexts) != set(held[0]):
            items.append(("Scored contexts", ", ".join(bench.contexts) or "–"))
    if meta.get("profile"):
        items.append(("Profile", str(meta["profile"])))
    items.append(("Models", ", ".join(bench.models) or "–"))
    if (options := _model_options(meta)) is not None:
        items.append(("Model options", options))
    items += [
        ("Perturbation column", bench.pert_col),
        ("Control label", bench.control),
        ("Context column", bench.context_col or "–"),
        ("Seed", str(meta.get("seed", "–"))),
        ("Baseline (VCC 2025 score = 0)", str(meta.get("baseline", "cell_mean"))),
        *([("Baseline (VCC 2026 score = 0)", "each context's mean-response baseline (1 = a split-half replicate)")]
          if meta.get("profile") == "vcc2026" else []),
        ("Benchmark directory", Path(str(meta.get("out") or bench.root)).name),  # written in a staging folder
    ]
    if meta.get("created"):
        items.append(("Benchmark run", str(meta["created"])))
    items += [
        ("Report generated", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("vcell version", __version__),
    ]
    return (f'<header class="top"><h1>{esc(title)}</h1><p class="subtitle">{esc(_subtitle(held))}</p>'
            f"{definition_list(items)}</header>")


def _best(rows, column: str):
    if column not in rows.columns:
        return None
    values = rows[column].astype("float64").to_numpy(na_value=np.nan)
    return None if not np.isfinite(values).any() else rows.iloc[int(np.nanargmax(values))]


def _named(rows, column: str, best) -> str:
    """The best row's model, with the models tied with it on ``column`` (first in row order wins nothing)."""
    tied = [str(m) for m, v in zip(rows["model"], rows[column].astype("float64")) if v == best[column] and m != best["model"]]
    return f"<b>{esc(best['model'])}</b>" + (f" (tied with {esc(', '.join(tied))})" if tied else "")


def _beyond_note(bench: Bench, model: str) -> str:
    """A sentence when ``model``'s 2026 score rests on metrics beyond the replicate anchor (``bench.json``)."""
    found = [b for b in bench.meta.get("vcc2026_beyond_replicate") or [] if isinstance(b, dict) and b.get("model") == model]
    if not found:
        return ""
    names = sorted({str(b.get("metric")) for b in found})
    return (f" Its score includes {', '.join(names)} beyond the replicate anchor in {len({(b.get('fold'), b.get('context')) for b in found})} "
            "context(s), where the metric cannot tell a model from a replicate (see the notes by the 2026 table).")


def headline(bench: Bench) -> str:
    """The best model: by the VCC 2026 score when the benchmark has it (the 2025 best after it), else by the VCC 2025 score."""
    lb = bench.leaderboard
    rows = lb[lb["context"] == MEAN_CONTEXT]
    where = f"mean over {len(bench.contexts)} scored contexts" if len(bench.contexts) > 1 else "context " + ", ".join(bench.contexts)
    if rows.empty:
        rows, where = lb, "single run"
    best, best_2026 = _best(rows, SCORE), _best(rows, SCORE_2026)
    baseline = esc(bench.meta.get("baseline", "cell_mean"))
    said_2025 = ""
    if best is not None:
        unclipped = ""
        if SCORE_UNCLIPPED in rows.columns:
            below = ": below the baseline once unclipped" if best[SCORE_UNCLIPPED] < 0 else ""
            unclipped = f" (unclipped {fmt_number(best[SCORE_UNCLIPPED])}{below})"
        said_2025 = (f"VCC score <b>{esc(fmt_number(best[SCORE]))}</b>{esc(unclipped)}. 0 = as good as the {baseline} "
                     "baseline, 100 = perfect (scores are x100, as on the VCC leaderboard).")
    if best_2026 is not None:
        text = (f"Best model ({esc(where)}): {_named(rows, SCORE_2026, best_2026)}, VCC 2026 score "
                f"<b>{esc(fmt_number(best_2026[SCORE_2026]))}</b> (0 = the context's mean-response baseline, 1 = a "
                f"replicate of the experiment).{_beyond_note(bench, str(best_2026['model']))}")
        if best is not None:
            text += f" By the VCC 2025 score: {_named(rows, SCORE, best)}, " + said_2025
    elif best is not None:
        text = f"Best model ({esc(where)}): {_named(rows, SCORE, best)}, " + said_2025
    else:
        return ""
    return f'<div class="headline">{text}</div>'
