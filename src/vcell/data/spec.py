"""How a dataset's columns are named: the perturbation, control label, context and batch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from vcell.errors import VcellError, close_matches

ExpressionType = Literal["counts", "log1p"]
EXPRESSION_TYPES: tuple[str, ...] = ("counts", "log1p")
SINGLE_CONTEXT = "all"
COMBO_SEP = "+"
#: How a cell set's control cells are drawn: each from its perturbed cell's batch (when the data has one) or at random.
CONTROL_STRATEGIES = ("batch", "random")
#: Cells per set unless told otherwise (training, prediction and the CLI all use this default).
DEFAULT_SET_SIZE = 64


@dataclass(frozen=True)
class DataSpec:
    """Column conventions of a perturbation dataset.

    Parameters
    ----------
    pert_col
        ``.obs`` column holding the perturbation label of each cell.
    control
        Label of control (unperturbed) cells in ``pert_col``.
    context_col
        ``.obs`` column with the cell context (cell type / line). ``None``: one context.
    batch_col
        Optional ``.obs`` column with the batch (e.g. ``gem_group``), used for control matching.
    expression
        ``"counts"`` or ``"log1p"``; ``None`` reads it from the file's metadata (see
        :func:`vcell.data.validate.infer_expression_type`).
    """

    pert_col: str = "target_gene"
    control: str = "non-targeting"
    context_col: str | None = "cell_type"
    batch_col: str | None = None
    expression: ExpressionType | None = None

    def __post_init__(self) -> None:
        for name in ("pert_col", "control", "context_col", "batch_col"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name in ("context_col", "batch_col"))):
                raise VcellError(f"DataSpec {name}={value!r}: a column name or label is text"
                                 + (" (None: no such column)" if name in ("context_col", "batch_col") else ""))
        if self.expression is not None and self.expression not in EXPRESSION_TYPES:
            raise VcellError(f"DataSpec expression={self.expression!r}: use 'counts', 'log1p' or None (read from the file)")

    def with_(self, **changes) -> DataSpec:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def columns(self) -> list[str]:
        """The ``.obs`` columns this spec needs."""
        return [c for c in (self.pert_col, self.context_col, self.batch_col) if c]


def split_combo(label: str) -> list[str]:
    """Targets of a perturbation label: ``"A+B"`` -> ``["A", "B"]``; ``"A"`` -> ``["A"]``."""
    return [t for t in str(label).split(COMBO_SEP) if t]


#: Words in the names of columns that usually hold each role, most telling first (scverse,
#: cell-load, PerturBench and GEO conventions).
_ROLE_WORDS = {
    "perturbation": ("perturbation", "target", "guide", "grna", "sgrna", "gene", "condition", "treatment", "drug", "stim", "pert"),
    "context": ("cell_type", "celltype", "cell_line", "cellline", "line", "context", "annotation", "cluster"),
    "batch": ("batch", "gem_group", "gem", "lane", "library", "sample", "replicate", "rep"),
}


def column_guess(col: str, columns: Iterable, role: str) -> str:
    """``"; did you mean 'x', 'y'?"`` for a missing ``role`` column (``perturbation``, ``context`` or
    ``batch``): columns whose names say that role first, then names spelled like ``col``; else ``""``.

    Examples
    --------
    >>> column_guess("target_gene", ["ncounts", "perturbation", "dataset", "treatment"], "perturbation")
    "; did you mean 'perturbation', 'treatment'?"
    """
    names = [str(c) for c in columns]
    words = _ROLE_WORDS.get(role, ())
    guesses = [n for w in words for n in names if n.casefold() == w]  # a column named for the role first
    for word in words:
        guesses += [n for n in names if word in n.casefold() and n not in guesses]
    guesses = guesses[:2] + close_matches(col, [n for n in names if n not in guesses[:2]], n=1)
    return f"; did you mean {', '.join(map(repr, guesses))}?" if guesses else ""
