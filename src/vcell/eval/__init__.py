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
* :mod:`~vcell.eval.prep`: a prediction packed as a ``.vcc`` submission archive.

This package depends on :mod:`vcell.data` only (never on torch).
"""

from __future__ import annotations

from vcell.eval.baseline import build_cell_mean_baseline, cell_mean_vector
from vcell.eval.de import DEResult, MannWhitneyResult, bh_fdr, de_arrays, differential_expression, mannwhitney_vs_reference
from vcell.eval.inputs import INPUT_TYPES, EvalPair, check_pair, check_structure, prepare, to_log1p
from vcell.eval.metrics import (
    REGISTRY,
    DEData,
    ExpressionData,
    Metric,
    MetricUndefined,
    get_metric,
    list_metrics,
    register,
)
from vcell.eval.prep import prepare_submission, read_gene_list, read_submission
from vcell.eval.profiles import PERTURBATION_COLUMN, PROFILES, compute_results, profile_metrics
from vcell.eval.run import EvalResult, evaluate, write_de_csv, write_outputs
from vcell.eval.scoring import STATISTICS, agg_results, read_csv, score, write_csv

__all__ = [
    "DEData",
    "DEResult",
    "EvalPair",
    "EvalResult",
    "ExpressionData",
    "INPUT_TYPES",
    "MannWhitneyResult",
    "Metric",
    "MetricUndefined",
    "PERTURBATION_COLUMN",
    "PROFILES",
    "REGISTRY",
    "STATISTICS",
    "agg_results",
    "bh_fdr",
    "build_cell_mean_baseline",
    "cell_mean_vector",
    "check_pair",
    "check_structure",
    "compute_results",
    "de_arrays",
    "differential_expression",
    "evaluate",
    "get_metric",
    "list_metrics",
    "mannwhitney_vs_reference",
    "prepare",
    "prepare_submission",
    "profile_metrics",
    "read_csv",
    "read_gene_list",
    "read_submission",
    "register",
    "score",
    "to_log1p",
    "write_csv",
    "write_de_csv",
    "write_outputs",
]
