"""vcell: predict how cells respond to perturbations in contexts never (or only partly) seen.

The public API, one import away (``import vcell``); everything the command line does is here.

Data
    :class:`DataSpec` (which ``.obs`` columns mean what), :func:`load_dataset` (a file or an AnnData),
    :func:`simulate_perturbseq`, :func:`holdout_config` (held-out contexts) /
    :func:`holdout_perturbations` (perturbations held out in every context) / :func:`read_split_toml`
    and :func:`apply_split` (which cells train, validate and are held out; refuses leaks).
Models
    :func:`model_names`, :func:`make_model` (the baselines and the State Transition model,
    ``fit(data, split)``), :class:`STPredictor`, :func:`train_st` and :func:`train_se` with
    :class:`STTrainOptions` / :class:`SETrainOptions`, and :func:`predict_context` (predicted cells
    of a context's perturbations from its real control cells; log1p, or raw counts with
    ``output="counts"``, :func:`to_counts`; :func:`write_prediction` writes them to a file piece
    by piece, as ``vcell predict`` does).
Evaluation
    :func:`evaluate` (the Virtual Cell Challenge metrics, cell-eval's numbers), :func:`score`
    (scaled against a baseline), :func:`evaluate_2026`, :func:`scale_2026` and :func:`score_2026`
    (the 2026 challenge's metrics on raw counts and their baseline-to-replicate scale,
    cell-eval2's numbers), :func:`precompile_evaluator` (the evaluator's kernels compiled ahead
    of its first run, ``vcell eval compile``), :func:`run_bench` (every model on the same split,
    a leaderboard) and :func:`build_report` (its HTML report).

Progress
    Long steps (ST training, prediction, evaluation, benchmarks) show progress lines in an
    interactive session (Jupyter, IPython); :func:`show_progress` turns them on in a script (or off).

Subpackages, from the bottom up: ``vcell.data``, ``vcell.eval``, ``vcell.features``,
``vcell.nn``, ``vcell.train``, ``vcell.predictors``, ``vcell.report``, ``vcell.leaderboard``,
``vcell.cli``. Names load on first use, so ``import vcell`` is quick.

Examples
--------
>>> import vcell
>>> spec = vcell.DataSpec(pert_col="target_gene", control="non-targeting", context_col="cell_type")
>>> spec.control
'non-targeting'
>>> vcell.model_names()
['control_mean', 'cell_mean', 'pert_mean', 'context_mean', 'linear', 'kernel_ridge', 'st']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vcell._lazy import lazy_exports
from vcell._numba_cache import ensure_cache_folder
from vcell._version import __version__ as __version__
from vcell.errors import VcellError as VcellError

ensure_cache_folder()  # before any module defines a cached numba kernel

if TYPE_CHECKING:
    import anndata as ad

    from vcell.eval.run import EvalResult

_EXPORTS = {
    "vcell.data.spec": ["DataSpec"],
    "vcell.data.dataset": ["load_dataset"],
    "vcell.data.simulate": ["simulate_perturbseq"],
    "vcell.data.splits": ["apply_split", "holdout_config", "holdout_perturbations"],
    "vcell.data.split_files": ["read_split_toml"],
    "vcell.predictors.registry": ["make_model", "model_names"],
    "vcell.predictors.predict": ["predict_context", "write_prediction"],
    "vcell.predictors.counts": ["to_counts"],
    "vcell.predictors.st": ["STPredictor"],
    "vcell.train.options": ["STTrainOptions", "SETrainOptions"],
    "vcell.train.st": ["train_st"],
    "vcell.train.se": ["train_se"],
    "vcell.eval.scoring": ["score"],
    "vcell.eval.vcc2026.api": ["evaluate_2026", "scale_2026", "score_2026"],
    "vcell.eval.precompile": ["precompile_evaluator"],
    "vcell.leaderboard": ["run_bench"],
    "vcell.report.build": ["build_report"],
    "vcell.train.display": ["show_progress"],
}
_lazy_all, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted([*_lazy_all, "VcellError", "__version__", "evaluate"])


def evaluate(
    pred: ad.AnnData,
    real: ad.AnnData,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    profile: str = "vcc",
    input_type: str = "auto",
    threads: int = 2,
    layer: str | None = None,
) -> EvalResult:
    """Score predicted cells against the real ones with a metric profile (``vcell eval run`` in memory).

    Parameters
    ----------
    pred, real
        Predicted and real cells: the same genes (any order), a perturbation column, control
        cells in both (log1p or counts).
    pert_col, control
        The perturbation column and its control label.
    profile
        ``vcc`` (the Virtual Cell Challenge 2025 metrics), ``full``, ``minimal``, ...
        (:data:`vcell.eval.profiles.PROFILES`).
    input_type
        ``auto``, ``log1p`` or ``counts``.
    threads
        Threads for differential expression.
    layer
        Score ``layers[layer]`` of ``real`` (and of ``pred`` when it has it) instead of ``X``.

    Returns
    -------
    EvalResult
        ``results`` (one row per perturbation), ``agg`` (statistics over perturbations) and the
        DE tables, as cell-eval 0.8.2 computes them.
    """
    from vcell.eval.inputs import check_pair, from_layer
    from vcell.eval.run import evaluate as evaluate_pair

    if layer is not None:
        real = from_layer(real, layer, "real")
        pred = from_layer(pred, layer, "pred") if layer in pred.layers else pred
    return evaluate_pair(check_pair(pred, real, pert_col, control, input_type, option="input_type"), profile, threads)
