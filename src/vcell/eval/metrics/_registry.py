"""The metric registry: :class:`Metric`, the :func:`register` decorator and the lookups.

A metric module registers each metric with one decorator line; importing
:mod:`vcell.eval.metrics` imports every metric module, so :data:`REGISTRY` is complete then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from vcell.errors import VcellError

if TYPE_CHECKING:
    from vcell.eval.metrics._inputs import DEData, ExpressionData

__all__ = ["KINDS", "REGISTRY", "Kind", "Metric", "MetricUndefined", "get_metric", "list_metrics", "register"]

Kind = Literal["de", "expression"]
KINDS: tuple[str, ...] = ("de", "expression")


class MetricUndefined(Exception):
    """The metric has no value for these inputs; cell-eval drops it from its tables."""


@dataclass(frozen=True)
class Metric:
    """A registered metric: ``func(data, **kwargs)`` with ``data`` a :class:`DEData` (kind
    ``"de"``) or an :class:`ExpressionData` (kind ``"expression"``)."""

    name: str
    kind: str
    best: float | None
    func: Callable[..., Any]
    description: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, data: DEData | ExpressionData, **overrides: Any) -> pd.Series | pd.DataFrame | float:
        """The metric on ``data``, with ``overrides`` replacing the bound keyword arguments."""
        return self.func(data, **{**self.kwargs, **overrides})


#: Every metric, by name, in registration order (the order of cell-eval's ``full`` profile
#: within each kind).
REGISTRY: dict[str, Metric] = {}


def register(name: str, *, kind: Kind, best: float | None, description: str = "", **kwargs: Any):
    """Decorator registering ``func`` as metric ``name``; ``kwargs`` are bound to every call.

    ``best`` is ``0.0`` (an error: lower is better), ``1.0`` (an agreement: higher is better) or
    ``None`` (not scored against a baseline).
    """
    if kind not in KINDS:
        raise ValueError(f"metric {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if best not in (0.0, 1.0, None):
        raise ValueError(f"metric {name!r}: best must be 0.0, 1.0 or None, got {best!r}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        REGISTRY[name] = Metric(name, kind, best, func, description or (func.__doc__ or "").split("\n")[0], dict(kwargs))
        return func

    return decorate


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise VcellError(f"unknown metric {name!r}; known metrics: {known}") from None


def list_metrics(kind: Kind | None = None) -> list[str]:
    """Names of the registered metrics (of one kind), in registration order."""
    return [name for name, m in REGISTRY.items() if kind is None or m.kind == kind]
