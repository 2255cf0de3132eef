"""The Virtual Cell Challenge 2026 evaluator: cell-eval2's ``vcc2026`` metrics on raw counts.

* :mod:`~vcell.eval.vcc2026.inputs`: reading raw counts and the checks the challenge applies;
* :mod:`~vcell.eval.vcc2026.summary`: one pass per side: pseudobulks, mean CPM, Wilcoxon tests
  against the reference's controls, jackknife corrections (:mod:`~vcell.eval.vcc2026.jackknife`);
* :mod:`~vcell.eval.vcc2026.metrics`: the six scored metrics and the four diagnostics;
* :mod:`~vcell.eval.vcc2026.evaluate`: a prediction scored against a summarised reference;
* :mod:`~vcell.eval.vcc2026.anchor` and :mod:`~vcell.eval.vcc2026.baseline`: the two ends of the
  scale; :mod:`~vcell.eval.vcc2026.scale`: the scaled score;
* :mod:`~vcell.eval.vcc2026.tables`: cell-eval2's output tables.
"""
