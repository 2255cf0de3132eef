"""Predictors: the :class:`Predictor` interface, the baselines and the State Transition model.

Every predictor is fitted with ``fit(data, split)`` and predicts with ``predict(controls,
perturbations, context)``; :func:`make_model` builds one by name and :func:`predict_context`
predicts a context's perturbations from a dataset.
"""

from vcell._lazy import lazy_exports

_EXPORTS = {
    ".base": ["Predictor", "ShiftPredictor", "assemble_prediction"],
    ".baselines": ["BASELINES", "CellMean", "ContextMean", "ControlMean", "KernelRidgeBaseline", "LinearBaseline", "PertMean", "TrainingStats", "make_baseline", "training_stats"],
    ".predict": ["predict_context", "write_prediction"],
    ".registry": ["MODELS", "make_model", "model_names"],
    ".st": ["STPredictor"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
