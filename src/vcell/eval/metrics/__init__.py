"""The Virtual Cell Challenge metrics, computed exactly as cell-eval 0.8.2 computes them.

Each metric is a small function registered under its cell-eval name with its kind (``"de"``:
computed from the differential-expression tables; ``"expression"``: from pseudobulk expression)
and its best value (``0.0`` for errors, ``1.0`` for agreement scores, ``None`` for quantities
that are not compared with a baseline). Profiles (:mod:`vcell.eval.profiles`) are lists of these
names; :func:`vcell.eval.profiles.compute_results` runs a profile and builds cell-eval's
``results`` table; :mod:`vcell.eval.scoring` aggregates it and scores it against a baseline.

Inputs are two plain objects that a pipeline builds once:

* :class:`ExpressionData`: per-perturbation pseudobulks (mean over cells of the log1p
  expression) of the prediction and of the real data, ``[n_perts, n_genes]``, the two control
  pseudobulks, the gene and perturbation names and, for ``pearson_edistance``, the energy
  distance of each perturbation's cells to the control cells (or a callable computing them on
  demand, one perturbation block at a time: see :func:`energy_distances`).
  :meth:`ExpressionData.from_anndata` builds it from two in-memory AnnData objects.
* :class:`DEData`: the real and predicted differential-expression tables in pdex's long layout
  (``target``, ``feature``, ``log2_fold_change``, ``p_value``, ``fdr``, ...), aligned once into
  ``[n_perts, n_features]`` arrays.

A metric returns either one value per perturbation (a :class:`pandas.Series` indexed by
perturbation; a perturbation missing from the index is a *null* in ``results``, a NaN value is a
NaN, exactly as in cell-eval's polars tables), one value for all perturbations (a float), or
several named values per perturbation (a :class:`pandas.DataFrame`, one column per sub-metric,
written as ``<name>_<column>``). A metric raises :class:`MetricUndefined` where cell-eval's
computation fails and cell-eval therefore leaves the metric out of its tables (e.g.
``pearson_edistance`` with a single perturbation).

Behaviour of cell-eval reproduced on purpose (see each function for details): DE values are cast
to float32 before any comparison or ranking; significance is ``fdr < 0.05`` on those float32
values; the perturbation's own gene column is excluded from the discrimination distances; the
rank in the discrimination score is the position in ``numpy.argsort`` of the distances; ties in
Spearman correlations get average ranks and NaN ranks above every number; ``pr_auc`` /
``roc_auc`` score genes by ``-log10`` of the float32-clipped predicted FDR.

Layout: :mod:`._registry` (:class:`Metric`, :func:`register`, :data:`REGISTRY`), :mod:`._inputs`
(:class:`ExpressionData`, :class:`DEData`, :func:`pseudobulk`), :mod:`._energy` (energy
distances), :mod:`._stats` (ranks, correlations, AUCs), and the metrics themselves in
:mod:`._de_based` and :mod:`._expression`. Importing this package imports both metric modules,
so every metric is registered. Adding a metric is one function and one registration line in
one of them, e.g.::

    @register("my_metric", kind="expression", best=0.0)
    def my_metric(x: ExpressionData) -> pd.Series: ...
"""

from __future__ import annotations

# The metric modules register their metrics on import; DE metrics first, then expression
# metrics, so that REGISTRY follows the order of cell-eval's ``full`` profile within each kind.
from vcell.eval.metrics import _de_based, _expression  # noqa: F401
from vcell.eval.metrics._de_based import (
    FDR_THRESHOLD,
    de_auc,
    de_direction_match,
    de_nsig_counts,
    de_overlap,
    de_sig_genes_recall,
    de_spearman_lfc_sig,
    de_spearman_sig,
)
from vcell.eval.metrics._energy import (
    EnergyDistances,
    as_rows,
    energy_distance,
    energy_distances,
    mean_pairwise_distance,
)
from vcell.eval.metrics._expression import clustering_agreement, discrimination_score, pearson_edistance
from vcell.eval.metrics._inputs import DEData, ExpressionData, as_cell_eval_bulk, pseudobulk
from vcell.eval.metrics._registry import (
    KINDS,
    REGISTRY,
    Kind,
    Metric,
    MetricUndefined,
    get_metric,
    list_metrics,
    register,
)
from vcell.eval.metrics._stats import _average_precision, _average_ranks, _pearson, _roc_auc, _spearman  # noqa: F401

__all__ = [
    "DEData",
    "EnergyDistances",
    "ExpressionData",
    "FDR_THRESHOLD",
    "KINDS",
    "Kind",
    "Metric",
    "MetricUndefined",
    "REGISTRY",
    "as_cell_eval_bulk",
    "as_rows",
    "clustering_agreement",
    "de_auc",
    "de_direction_match",
    "de_nsig_counts",
    "de_overlap",
    "de_sig_genes_recall",
    "de_spearman_lfc_sig",
    "de_spearman_sig",
    "discrimination_score",
    "energy_distance",
    "energy_distances",
    "get_metric",
    "list_metrics",
    "mean_pairwise_distance",
    "pearson_edistance",
    "pseudobulk",
    "register",
]
