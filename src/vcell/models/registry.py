"""Model names used by ``vcell bench``: the baselines (and, later, the STATE models)."""

from __future__ import annotations

import difflib

from vcell.errors import VcellError
from vcell.models.base import Predictor


def model_names() -> list[str]:
    """Every model ``make_model`` knows."""
    from vcell.models.baselines import BASELINES

    return [*BASELINES, "st"]


def make_model(name: str, seed: int = 0, **options) -> Predictor:
    """A fresh, unfitted predictor by name; ``options`` go to the ``st`` model's constructor."""
    from vcell.models.baselines import BASELINES

    if name == "st":
        import inspect

        from vcell.models.st_predictor import STPredictor

        known = [p for p in inspect.signature(STPredictor).parameters if p != "seed"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise VcellError(f"st: unknown option(s) {', '.join(map(repr, unknown))} (options: {', '.join(known)})")
        return STPredictor(seed=seed, **options)
    if name not in BASELINES:
        close = difflib.get_close_matches(name, model_names(), n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise VcellError(f"unknown model {name!r}{hint} (models: {', '.join(model_names())})")
    if options:
        raise VcellError(f"{name}: this baseline takes no options (got {', '.join(map(repr, sorted(options)))})")
    return BASELINES[name](seed=seed)
