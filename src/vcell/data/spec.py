"""How a dataset's columns are named: the perturbation, control label, context and batch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

ExpressionType = Literal["counts", "log1p"]
EXPRESSION_TYPES: tuple[str, ...] = ("counts", "log1p")
SINGLE_CONTEXT = "all"
COMBO_SEP = "+"
#: How a cell set's control cells are drawn: from the same batch (when the data has one) or at random.
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
