"""Evaluation of predicted perturbation responses: the Virtual Cell Challenge metrics.

Computed as cell-eval 0.8.2 computes them, from a prediction and the truth (two AnnData objects
or ``.h5ad`` files with log1p expression and a perturbation column):

* :mod:`~vcell.eval.inputs`: check a (prediction, truth) pair (:func:`check_pair`);
* :mod:`~vcell.eval.de`: the differential-expression engine (:func:`differential_expression`);
* :mod:`~vcell.eval.metrics`: the metric registry, its inputs and every metric;
* :mod:`~vcell.eval.profiles`: named lists of metrics (:data:`PROFILES`) and the results table;
* :mod:`~vcell.eval.scoring`: aggregation and the baseline-scaled score (:func:`score`);
* :mod:`~vcell.eval.run`: the pipeline (:func:`evaluate` on a checked pair; ``run`` from files
  to output tables, reached as ``vcell.eval.run.run``: it is not re-exported here, since the
  name would hide the submodule ``vcell.eval.run``);
* :mod:`~vcell.eval.baseline`: the cell-mean baseline prediction;
* :mod:`~vcell.eval.prep`: a prediction packed as a ``.vcc`` submission archive;
* :mod:`~vcell.eval.csvio`: the tables in cell-eval's CSV format;
* :mod:`~vcell.eval.vcc2026`: the Virtual Cell Challenge 2026 metrics (cell-eval2, raw counts).

This package depends on :mod:`vcell.data` only (never on torch).
"""

from __future__ import annotations

from vcell._lazy import lazy_exports

# Names load on first use: the VCC 2026 evaluator (vcell.eval.vcc2026) and the CSV helpers
# (vcell.eval.csvio) are reached without the 2025 engine, its metric registry or anndata.
_EXPORTS = {
    "vcell.eval.baseline": ["build_cell_mean_baseline", "cell_mean_vector"],
    "vcell.eval.de": ["DEResult", "MannWhitneyResult", "bh_fdr", "de_arrays", "differential_expression", "mannwhitney_vs_reference"],
    "vcell.eval.inputs": ["INPUT_TYPES", "EvalPair", "check_pair", "check_structure", "prepare", "to_log1p"],
    "vcell.eval.metrics": ["REGISTRY", "DEData", "ExpressionData", "Metric", "MetricUndefined", "get_metric", "list_metrics", "register"],
    "vcell.eval.prep": ["prepare_submission", "read_gene_list", "read_submission"],
    "vcell.eval.profiles": ["PERTURBATION_COLUMN", "PROFILES", "compute_results", "profile_metrics"],
    "vcell.eval.run": ["EvalResult", "evaluate", "write_outputs"],
    "vcell.eval.scoring": ["STATISTICS", "agg_results", "score"],
    "vcell.eval.csvio": ["read_csv", "write_csv", "write_de_csv"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
