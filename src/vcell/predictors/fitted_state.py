"""A fitted shift baseline (``kernel_ridge``, ``linear``, ``pert_mean``, ...) written to one
pickle-free file and read back: how an ST checkpoint keeps its effect anchor.

The file is a safetensors file whose metadata holds a JSON index (:func:`vcell.nn.checkpoint.save_tree`):
the baseline's name, its options (plain values), its data columns and its fitted attributes
(sklearn's trailing-underscore convention): arrays as tensors, gene and label indexes as lists,
a perturbation feature table as its vectors and names. What a fitted model keeps only for
reporting (the training pseudobulks, the cross-validation scores) is not stored; the model
read back predicts the same shifts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vcell.data.spec import DataSpec
from vcell.errors import VcellError
from vcell.features.perturbations import PertFeatures
from vcell.nn.checkpoint import load_tree, save_tree

#: The effect anchor's file in an ST checkpoint folder.
ANCHOR = "anchor.safetensors"
#: Fitted attributes kept for reporting or set per prediction call, not needed to predict.
_NOT_STORED = {"stats_", "cv_scores_", "featureless_", "fallback_"}
_PLAIN = (bool, int, float, str, type(None))


def _encode(name: str, value):
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise VcellError(f"cannot store the fitted attribute {name!r} (an object array)")
        return {"array": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, pd.Index):
        return {"index": [str(v) for v in value]}
    if isinstance(value, PertFeatures):
        return {"features": value.to_meta(), "vectors": value.vectors}
    if isinstance(value, np.generic) or isinstance(value, _PLAIN):
        return {"value": value.item() if isinstance(value, np.generic) else value}
    raise VcellError(f"cannot store the fitted attribute {name!r} of type {type(value).__name__}")


def _decode(entry: dict):
    if "array" in entry:
        return entry["array"].numpy()
    if "index" in entry:
        return pd.Index(entry["index"], dtype=object)
    if "features" in entry:
        return PertFeatures.from_meta(entry["features"], entry["vectors"])
    return entry["value"]


def save_fitted(model, path: str | os.PathLike) -> Path:
    """Write the fitted baseline ``model`` to ``path`` (safetensors); returns the path."""
    if getattr(model, "spec", None) is None:
        raise VcellError(f"{model.name}: not fitted, nothing to save")
    attrs = vars(model)
    params = {k: v for k, v in attrs.items() if not k.startswith("_") and not k.endswith("_") and k not in ("spec", "pert_features")
              and (isinstance(v, _PLAIN) or (isinstance(v, (list, tuple)) and all(isinstance(x, _PLAIN) for x in v)))}
    fitted = {k: _encode(k, v) for k, v in attrs.items() if k.endswith("_") and not k.startswith("_") and k not in _NOT_STORED}
    tree = {"name": model.name, "params": params, "spec": dataclasses.asdict(model.spec), "fitted": fitted}
    path = Path(path)
    save_tree(tree, path)
    return path


def load_fitted(path: str | os.PathLike):
    """The baseline :func:`save_fitted` wrote to ``path``, ready to predict."""
    from vcell.predictors.baselines import BASELINES

    path = Path(path)
    tree = load_tree(path)
    try:
        cls = BASELINES[tree["name"]]
        model = cls.__new__(cls)
        for key, value in tree["params"].items():
            setattr(model, key, tuple(value) if isinstance(value, list) else value)
        model.pert_features = None  # the table is stored with the fitted attributes
        model.spec = DataSpec(**tree["spec"])
        for key, entry in tree["fitted"].items():
            setattr(model, key, _decode(entry))
    except (KeyError, TypeError) as exc:
        raise VcellError(f"{path}: not a fitted baseline written by vcell ({type(exc).__name__}: {exc})") from None
    return model
