"""``vcell bench``: train every model on the same split, predict held-out contexts, score them all.

Layout of the output folder (the report reads it):

- ``leaderboard.csv``: ``model``, ``context``, one column per metric (mean over
  perturbations), ``vcc_score`` and ``vcc_score_unclipped`` (VCC 2025 score x 100, scaled
  against ``cell_mean``); one row per model per held-out context plus a ``mean`` context.
- ``predictions/<model>_<context>.h5ad`` and ``predictions/real_<context>.h5ad``.
- ``eval/<model>_<context>/``: ``results.csv``, ``agg_results.csv``, ``real_de.csv``, ``pred_de.csv``.
- with ``profile="vcc2026"`` (raw-count data): the 2025 ``vcc`` metrics as above, and the VCC 2026
  score next to them: ``eval/vcc2026_scale_<context>/`` holds both ends of the context's scale
  (mean-response baseline, split-half replicate anchor), ``eval/<model>_<context>/vcc2026/`` the
  model's ``results.csv``, ``agg_results.csv`` and ``score.csv``; the leaderboard gains
  ``vcc2026_score`` and the six scaled metrics ``vcc2026_<metric>``. Predictions are log1p; each
  is scored as counts drawn from it the way ``vcell predict --output counts`` draws them
  (:func:`vcell.predictors.counts.to_counts`, ``depth="controls"``): each predicted cell at the
  library size of the real control cell it started from (drawn from the controls' for models
  whose cells start from none), seeded.
- ``bench.json``: what was run: data, split, the profile as given, models and the options each was
  built with (``model_options``), seed, runs, timings; per fold its scored and held-out contexts
  and perturbations (:func:`fold_record`); with ``vcc2026``, per context the scale caveats, the
  target-gene rule used (``vcc2026_target_genes``) and the runs beyond the replicate anchor
  (``vcc2026_beyond_replicate``; :mod:`vcell.leaderboard.vcc2026`).
- ``report.html``.
- ``bench.partial/`` while a benchmark runs, and after one stopped with finished runs (a model on
  a fold) to continue from: ``--resume`` (:mod:`vcell.leaderboard.resume`).

Dependencies flow cli -> leaderboard -> (predictors, train, eval, report) -> data.
"""

from vcell.leaderboard.bench import (
    BASELINE_MODEL,
    BENCH_OUTPUTS,
    VCC_METRICS,
    BenchResult,
    bench_files,
    prepare_data,
    run_bench,
    slug,
    vcc_score,
)
from vcell.leaderboard.folds import Fold, fold_record, make_folds
from vcell.leaderboard.resume import PARTIAL

__all__ = ["BASELINE_MODEL", "BENCH_OUTPUTS", "PARTIAL", "VCC_METRICS", "BenchResult", "Fold", "bench_files", "fold_record", "make_folds",
           "prepare_data", "run_bench", "slug", "vcc_score"]
