"""Every model by name: the baselines and the State Transition model (``vcell bench --models``)."""

from __future__ import annotations

from vcell.errors import VcellError, did_you_mean
from vcell.predictors.base import Predictor
from vcell.predictors.baselines import BASELINES
from vcell.predictors.st import STPredictor

MODELS: dict[str, type[Predictor]] = {**BASELINES, "st": STPredictor}


def model_names() -> list[str]:
    """Every model :func:`make_model` knows.

    Examples
    --------
    >>> model_names()[:3]
    ['control_mean', 'cell_mean', 'pert_mean']
    """
    return list(MODELS)


def make_model(name: str, seed: int = 0, **options) -> Predictor:
    """A fresh, unfitted predictor by name.

    Parameters
    ----------
    name
        One of :func:`model_names`.
    seed
        The model's seed.
    **options
        Constructor options: for ``st`` the :class:`~vcell.predictors.st.STPredictor` options
        (``preset``, ``config``, ``max_steps``, ``set_size``, ``precision``, ...); the baselines
        take none.

    Examples
    --------
    >>> make_model("pert_mean").name
    'pert_mean'
    """
    if name not in MODELS:
        raise VcellError(f"unknown model {name!r}{did_you_mean(name, MODELS, n=2)} (models: {', '.join(MODELS)})")
    if name == "st":
        known = [o for o in STPredictor.option_names() if o != "seed"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise VcellError(f"st: unknown option(s) {', '.join(map(repr, unknown))} (options: {', '.join(known)})")
        return STPredictor(seed=seed, **options)
    if options:
        raise VcellError(f"{name}: this baseline takes no options (got {', '.join(map(repr, sorted(options)))})")
    return MODELS[name](seed=seed)
