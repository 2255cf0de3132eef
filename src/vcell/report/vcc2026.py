"""The report's VCC 2026 texts: what its columns mean, how the score is scaled, and the caveats
``bench.json`` records (scales to read with care, models beyond the replicate anchor)."""

from __future__ import annotations

from vcell.report.html import esc, fmt_number
from vcell.report.inputs import Bench

__all__ = ["GLOSSARY_2026", "PREFIX", "beyond_replicate_note", "scale_caveats_note", "short_label", "table_note"]

#: Leaderboard columns of the VCC 2026 score (``vcc2026_score``) and its six scaled metrics.
PREFIX = "vcc2026_"

#: One line per VCC 2026 leaderboard column (metric definitions: cell-eval2 0.20.0, preset vcc2026).
GLOSSARY_2026 = {
    "vcc2026_score": "VCC 2026 score: mean of the six scaled metrics below (0 = the context's mean-response baseline, "
                     "1 = a replicate of the experiment)",
    "vcc2026_pds_cosine": "perturbation discrimination: rank of the true perturbation among all real effects by cosine "
                          "distance to the predicted effect (target genes left out; 0.5 = no information), scaled",
    "vcc2026_expr_mse_unbiased_capped_norm": "squared error of the predicted profile relative to the real effect size, "
                                             "sampling noise removed from both; scaled, clamped to [0, 1]",
    "vcc2026_de_wilcoxon_direction_fidelity_yield_raw": "significant DE genes called with the right sign / max(predicted, "
                                                        "real significant genes), scaled",
    "vcc2026_de_wilcoxon_direction_reach_raw": "how deep into the real significant DE genes, ordered by the prediction, "
                                               "the sign agreement stays at 0.9 or more, scaled",
    "vcc2026_de_wilcoxon_sig_jaccard": "Jaccard index of the predicted and real significant DE gene sets, scaled",
    "vcc2026_de_wilcoxon_lfc_nmae": "error of the predicted log2 fold changes over the real significant genes (10 or "
                                    "more), relative to their size; scaled, floored at -6",
}


def short_label(column: str) -> str:
    """A 2026 column's table header: the metric without the ``vcc2026_`` prefix, breakable at each underscore (HTML)."""
    return esc(column.removeprefix(PREFIX)).replace("_", "_<wbr>")


def table_note() -> str:
    """How the VCC 2026 score is scaled (the note above its table)."""
    return ('<p class="note">The <b>VCC 2026 score</b> (cell-eval2, preset vcc2026) places each metric on the '
            "scale of its context: 0 = the context's mean-response baseline, 1 = a replicate of the "
            "experiment (split-half anchor, 5 seeded splits); values above 1 and below 0 are kept "
            "(expr_mse_unbiased_capped_norm is clamped to [0, 1], de_wilcoxon_lfc_nmae floored at -6). "
            "A context's score is the mean of its six (columns: the metrics without their <code>vcc2026_</code> "
            "prefix); the <i>mean</i> row's score is the mean of the contexts' scores, and each of its metrics the "
            "mean of that metric over the contexts that score it, so the row's score is not the mean of the metrics "
            "beside it. "
            "Predictions are scored as counts drawn from them at the control cells' library sizes. A metric "
            "whose scale is degenerate on a context shows – and is left out of that context's score.</p>")


def scale_caveats_note(bench: Bench) -> str:
    """A note naming, per fold and context, the 2026 metrics whose scale is degenerate or not resolved
    (``vcc2026_scale_caveats`` of ``bench.json``); empty when every scale is sound."""
    items = []
    for c in bench.meta.get("vcc2026_scale_caveats") or []:
        said = [f"{label}: {esc('; '.join(c[key]))}" for key, label in (("degenerate", "degenerate, left out"),
                                                                        ("unresolved", "not resolved"),
                                                                        ("single_cell", "one cell, not in the anchor"))
                if c.get(key)]
        if said:
            items.append(f"<li>fold {esc(str(c.get('fold', '')))}, context {esc(str(c.get('context', '')))}: {' | '.join(said)}</li>")
    if not items:
        return ""
    return ('<p class="note"><b>Scales to read with care.</b> A <i>degenerate</i> scale (the baseline already at '
            "the replicate, or a metric undefined on it) is left out of the score. A scale <i>not resolved</i> has "
            "its replicate within two standard errors of its baseline over the anchor's splits: a scaled value "
            "there is the model's distance from the baseline magnified by an arbitrary factor, and can outweigh "
            "the other metrics in the mean. A metric left out on a context is averaged over the other contexts "
            'in its <i>mean</i> row.</p><ul class="note">' + "".join(items) + "</ul>")


def beyond_replicate_note(bench: Bench) -> str:
    """A warning naming each model, context and 2026 metric whose value lies beyond the replicate anchor
    (``vcc2026_beyond_replicate`` of ``bench.json``); empty when there is none."""
    items = []
    for b in bench.meta.get("vcc2026_beyond_replicate") or []:
        fate = "clamped to 1" if b.get("clamped") else "kept"
        items.append(f"<li>fold {esc(b.get('fold', ''))}, context {esc(b.get('context', ''))}: <b>{esc(b.get('model', ''))}</b>, "
                     f"{esc(b.get('metric', ''))} {esc(fmt_number(b.get('value')))} (replicate {esc(fmt_number(b.get('replicate')))}, "
                     f"baseline {esc(fmt_number(b.get('baseline')))}): scaled {esc(fmt_number(b.get('scaled')))}, {fate}</li>")
    if not items:
        return ""
    return ('<div class="warn"><b>Beyond the replicate.</b> These models score beyond the replicate anchor on these metrics '
            "(scaled above 1 before any clamp). There the metric cannot tell the model from a replicate of the "
            "experiment: the reference has too few perturbations, or cells per perturbation, to resolve it. "
            "The scaled value is no evidence of a better-than-replicate model. As in cell-eval2, "
            "expr_mse_unbiased_capped_norm is clamped to 1 and the other metrics keep their value above 1, "
            'which can outweigh the others in the score.<ul>' + "".join(items) + "</ul></div>")
