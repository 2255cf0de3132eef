"""The VCC 2026 side of ``vcell bench --profile vcc2026``: each held-out context's scale, each run's
scaled score, and what ``bench.json`` records about them.

:class:`Bench2026` holds a benchmark's scales and its records: per context the scale caveats
(degenerate or unresolved metrics) and the target-gene rule used, per run the metrics whose value
lies beyond the replicate anchor (:func:`beyond_replicate`). Numbers are cell-eval2's throughout;
the records only say how far to trust them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import anndata as ad
import pandas as pd
import scipy.sparse as sp

from vcell.data.labels import gene_name_column
from vcell.data.spec import DataSpec
from vcell.errors import preview
from vcell.eval.scoring import write_csv

log = logging.getLogger(__name__)

SCORE_2026 = "vcc2026_score"
#: The target-gene rules ``bench`` can apply (it takes no --target-genes map nor --no-target-genes).
RULE_EXCLUDED = "labels name measured genes: excluded"
RULE_NONE = "no label names a measured gene: none excluded"


class Bench2026:
    """The VCC 2026 scales and records of one benchmark.

    Parameters
    ----------
    spec : DataSpec
        The data's columns.
    threads, seed : int
        Threads for differential expression; seed of the counts drawn from each prediction.
    """

    def __init__(self, spec: DataSpec, threads: int, seed: int):
        self.spec, self.threads, self.seed = spec, threads, seed
        self.scales: dict[tuple[str, str], tuple] = {}
        self.scale_caveats: list[dict] = []
        self.target_genes: list[dict] = []
        self.beyond: list[dict] = []
        self._said: set[str] = set()

    def add_context(self, fold: str, context: str, real: ad.AnnData, folder: Path) -> None:
        """Build and write (to ``folder``) both ends of the scale of ``context`` in ``fold``; record its caveats."""
        where = f"fold {fold}, {context}"
        scale, totals, caveats, rule = _scale_2026(real, self.spec, self.threads, self.seed, folder, where)
        self.scales[(fold, context)] = (scale, totals)
        self.scale_caveats.append({"fold": fold, "context": context, **caveats})
        self.target_genes.append({"fold": fold, "context": context, **rule})
        if rule["rule"] not in self._said:  # once per benchmark (per rule), not per context
            self._said.add(rule["rule"])
            log.info("vcc2026 target genes (%s): %s", where, rule_note(rule))

    def fold_meta(self, fold: str) -> dict:
        """What was recorded of ``fold``'s contexts (:meth:`add_context`), for :meth:`restore`."""
        return {"caveats": [c for c in self.scale_caveats if c["fold"] == fold],
                "target_genes": [r for r in self.target_genes if r["fold"] == fold]}

    def restore(self, meta: dict) -> None:
        """Take back a fold's records (:meth:`fold_meta`) without computing its scales again (its
        runs were all scored before ``vcell bench --resume``)."""
        self.scale_caveats += meta["caveats"]
        self.target_genes += meta["target_genes"]
        self._said.update(r["rule"] for r in meta["target_genes"])

    def score(self, fold: str, model: str, context: str, pred: ad.AnnData, folder: Path,
              predictor=None) -> tuple[dict[str, float], list[dict]]:
        """Score one log1p prediction (``predictor``'s, whose
        :meth:`~vcell.predictors.base.Predictor.counts_basis` the counts are drawn from) on its
        context's scale (files in ``folder``): the leaderboard columns, and the metrics beyond the
        replicate anchor (warned about here; the caller adds them to :attr:`beyond` with the run's
        other results, which a resumed benchmark reads back)."""
        cols, table = _score_2026(pred, self.scales[(fold, context)], self.spec, self.threads, self.seed, folder, predictor)
        found = beyond_replicate(table)
        if found:
            log.warning("fold %s, %s: %s", fold, context, beyond_note(model, found))
        return cols, [{"fold": fold, "context": context, "model": model, **f} for f in found]

    def meta(self) -> dict:
        """What ``bench.json`` records of the 2026 scoring."""
        return {"vcc2026_scale_caveats": self.scale_caveats, "vcc2026_target_genes": self.target_genes,
                "vcc2026_beyond_replicate": self.beyond}


def target_gene_rule(real: ad.AnnData, spec: DataSpec, labels) -> dict:
    """The target-gene rule of a context: each label naming a measured gene has it excluded, unless
    no label does (drugs, cytokines, or targets the panel lacks: nothing to exclude).

    Returns ``{"rule", "labels", "labels_naming_genes"}`` (the two counts exclude the control).
    """
    # a control label may be a gene too (Kang's CTRL): it is never a target
    perts = set(labels) - {spec.control}
    named = len(perts & set(real.var_names))
    if not named and (found := gene_name_column(real.var, perts)):  # Ensembl IDs as var_names, symbols in a var column
        col, hits = found
        log.warning("%d of %d perturbation labels name genes of var[%r] (e.g. %r), not var_names: their target genes "
                    "are not excluded from the 2026 metrics; make var[%r] the var_names to exclude them",
                    len(hits), len(perts), col, sorted(hits)[0], col)
    return {"rule": RULE_EXCLUDED if named else RULE_NONE, "labels": len(perts), "labels_naming_genes": named}


def rule_note(rule: dict) -> str:
    """One sentence on a :func:`target_gene_rule`, saying how ``vcell eval`` would be told the same."""
    if rule["rule"] == RULE_EXCLUDED:
        return (f"{rule['labels_naming_genes']} of {rule['labels']} perturbation labels name a measured gene: each such "
                "gene is excluded from its own perturbation's metrics (as `vcell eval` does by default)")
    return (f"none of the {rule['labels']} perturbation labels names a measured gene: no target gene is excluded (as "
            "`vcell eval ... --no-target-genes`, which `vcell eval` asks for on such data); recorded in bench.json")


def beyond_replicate(table: pd.DataFrame) -> list[dict]:
    """The metrics of a score table (:func:`vcell.eval.vcc2026.scale.score_context`) whose model value
    lies beyond the replicate anchor: scaled above 1 before any clamp.

    There the metric cannot tell the model from a replicate of the experiment (too few perturbations
    or cells per perturbation resolve it): the value is no evidence of a better-than-replicate model.
    Each item: ``metric``, ``value``, ``baseline``, ``replicate``, ``scaled`` (before the clamp),
    ``score`` (as scored: clamped to 1 where the challenge clamps that metric) and ``clamped``.
    Degenerate scales and non-finite values are not named.
    """
    from vcell.eval.vcc2026.scale import POLICY

    out = []
    for row in table.itertuples(index=False):
        if row.metric not in POLICY:
            continue
        lower, _, _, high = POLICY[row.metric]
        u, b, r = float(row.value), float(row.baseline), float(row.replicate)
        span = (b - r) if lower else (r - b)
        if not (math.isfinite(u) and math.isfinite(span) and span > 0):
            continue
        s = 1.0 - (u - r) / span if lower else (u - b) / span  # cell-eval2's line, as in scale.scaled
        if s > 1.0:
            out.append({"metric": row.metric, "value": u, "baseline": b, "replicate": r, "scaled": s,
                        "score": float(row.score), "clamped": bool(s > high)})
    return out


def beyond_note(model: str, found: list[dict]) -> str:
    """The warning about one run's :func:`beyond_replicate` metrics."""
    said = "; ".join(
        f"{f['metric']} {f['value']:.4g} (replicate {f['replicate']:.4g}, baseline {f['baseline']:.4g}): scaled {f['scaled']:.4g}, "
        + ("clamped to 1 as cell-eval2 does" if f["clamped"] else "kept as cell-eval2 keeps it")
        for f in found)
    return (f"{model} lies beyond the replicate anchor on {said}. The metric cannot tell the model from a replicate of "
            "the experiment here (too few perturbations or cells), so this is no evidence of a better-than-replicate model")


def _scale_2026(real: ad.AnnData, spec: DataSpec, threads: int, seed: int, folder: Path, where: str):
    """Both ends of the VCC 2026 scale of one held-out context, written to ``folder``: ``(scale, the
    controls' library sizes, caveats, target-gene rule)``. A metric whose scale is degenerate or
    unresolved (:meth:`~vcell.eval.vcc2026.files.ContextScale.caveats`) is named once here (``where``:
    the fold and context), not for every model."""
    from vcell.eval.vcc2026.evaluate import de_targets
    from vcell.eval.vcc2026.files import Options, context_scale
    from vcell.eval.vcc2026.inputs import cells_from_anndata
    from vcell.eval.vcc2026.scale import degenerate_note, unresolved_note

    cells = cells_from_anndata(real, spec.pert_col, "the held-out cells", layer="counts")
    rule = target_gene_rule(real, spec, cells.groups)
    opts = Options(spec.pert_col, spec.control, no_target_genes=rule["rule"] == RULE_NONE, threads=threads,
                   strict=False)  # a degenerate metric is shown as such
    scale = context_scale(cells, opts, None, seed=0)
    caveats = scale.caveats()
    ref = scale.ref
    rule["de_targets_resolved"] = de_targets(ref.targets, ref.stated, ref.de.tested)[1]
    if not rule["de_targets_resolved"]:  # `vcell eval` refuses such a panel, as cell-eval2 does
        log.warning("%s: no perturbation's target gene is among the genes the held-out cells' DE tests (those their controls "
                    "express above 5 CPM): the four DE metrics are left out of every model's 2026 score there", where)
    caveats["single_cell"] = sorted(g for g in cells.groups if g != spec.control and cells.rows(g).size < 2)
    if caveats["single_cell"]:  # `eval baseline` refuses them, as cell-eval2 does; bench scores the rest of the anchor
        log.warning("%s: %d perturbation(s) with a single cell (%s): left out of the replicate anchor (it splits each "
                    "group in two halves), scored for every model against the others' replicate", where,
                    len(caveats["single_cell"]), preview(caveats["single_cell"], 3))
    if caveats["degenerate"]:
        log.warning("%s: %s; left out of every model's 2026 score there", where, degenerate_note(caveats["degenerate"]))
    if caveats["unresolved"]:
        log.warning("%s: %s", where, unresolved_note(caveats["unresolved"]))
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(scale.baseline_agg, folder / "baseline_agg_results.csv")
    write_csv(scale.anchor.agg, folder / "anchor_agg.csv")
    write_csv(scale.anchor.splits, folder / "anchor_splits.csv")
    rows = cells.rows(spec.control)
    return scale, pd.Series(cells.totals[rows], index=real.obs_names[rows].astype(str)), caveats, rule


def _score_2026(pred: ad.AnnData, scale, spec: DataSpec, threads: int, seed: int, folder: Path,
                predictor=None) -> tuple[dict[str, float], pd.DataFrame]:
    """A log1p prediction scored with the VCC 2026 metrics as counts drawn from it (:func:`to_counts`):
    the leaderboard columns and the score table."""
    from vcell.eval.vcc2026.evaluate import evaluate_cells
    from vcell.eval.vcc2026.inputs import CountsCells
    from vcell.eval.vcc2026.reader import labels_of
    from vcell.eval.vcc2026.scale import score_context
    from vcell.eval.vcc2026.tables import agg_means, agg_wide, results_long
    from vcell.predictors.counts import to_counts

    context_scale, control_totals = scale
    counts = to_counts(pred, control_totals, depth="controls", seed=seed, pert_col=spec.pert_col, control=spec.control,
                       totals_source="the held-out context's control cells' raw counts", model=predictor)
    labels, order = labels_of(counts.obs, spec.pert_col, "the prediction")
    cells = CountsCells(sp.csr_matrix(counts.X), labels, counts.var_names.copy(), "the prediction as counts", [g for g in order if g != spec.control])
    values, ratio = evaluate_cells(context_scale.ref, cells, threads, strict=False)
    res = results_long(context_scale.perturbations, values)
    agg = agg_wide(res, ratio)
    b, r = context_scale.ends()
    table = score_context(agg_means(agg), b, r, strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(res, folder / "results.csv")
    write_csv(agg, folder / "agg_results.csv")
    write_csv(table, folder / "score.csv")
    cols = {f"vcc2026_{m}": float(v) for m, v in zip(table["metric"], table["score"]) if m != "avg_score"}
    return {SCORE_2026: float(table.loc[table["metric"] == "avg_score", "score"].iloc[0]), **cols}, table
