"""Lazy re-exports for package ``__init__`` modules (PEP 562).

``import vcell`` or ``import vcell.train.options`` must not load torch and Lightning just to
reach one light module, so packages name their public objects here and import them on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose public names live in submodules.

    Parameters
    ----------
    package
        The package's ``__name__``.
    exports
        Module (absolute, or relative to ``package`` such as ``".st"``) -> the public names it defines.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        importlib.import_module(package).__dict__[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *where})

    return sorted(where), __getattr__, __dir__
