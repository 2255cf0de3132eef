"""Every model by name: the baselines and the State Transition model (``vcell bench --models``)."""

from __future__ import annotations

import inspect

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


def make_model(name: str, seed: int | None = None, **options) -> Predictor:
    """A fresh, unfitted predictor by name.

    Parameters
    ----------
    name
        One of :func:`model_names`.
    seed
        The model's seed (default 0; for ``st`` given ``options``: theirs).
    **options
        Constructor options: for ``st`` the :class:`~vcell.predictors.st.STPredictor` options
        (``preset``, ``config``, ``options`` (:class:`~vcell.train.options.STTrainOptions`),
        ``max_steps``, ``set_size``, ``precision``, ...); for ``linear``
        the :class:`~vcell.predictors.linear.LinearBaseline` ones (``pert_features``,
        ``alphas``, ``alpha``, ``n_folds``) and for ``kernel_ridge`` the
        :class:`~vcell.predictors.kernel_ridge.KernelRidgeBaseline` ones (``pert_features``,
        ``kernel``, ``alphas``, ``gammas``, ``alpha``, ``gamma``, ``n_folds``); the other
        baselines take none. An unknown option name or a bad value is one :class:`VcellError` line.

    Examples
    --------
    >>> make_model("pert_mean").name
    'pert_mean'
    >>> make_model("kernel_ridge", kernel="cosine").kernel
    'cosine'
    """
    if name not in MODELS:
        raise VcellError(f"unknown model {name!r}{did_you_mean(name, MODELS, n=2)} (models: {', '.join(MODELS)})")
    if name == "st":
        known = [o for o in STPredictor.option_names() if o != "seed"] + ["options"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise VcellError(f"st: unknown option(s) {', '.join(map(repr, unknown))} (options: {', '.join(known)})")
        return STPredictor(seed=seed, **options)
    seed = 0 if seed is None else seed
    cls = MODELS[name]
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")]
    if options and not known:
        raise VcellError(f"{name}: this baseline takes no options (got {', '.join(map(repr, sorted(options)))})")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise VcellError(f"{name}: unknown option(s) {', '.join(map(repr, unknown))} (options: {', '.join(known)})")
    try:
        return cls(seed=seed, **options)
    except (TypeError, ValueError) as exc:
        raise VcellError(f"{name}: bad option value ({exc})") from None
