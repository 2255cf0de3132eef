"""Which perturbations a split trains on: its labels with cells of some roles, and their single targets."""

from __future__ import annotations

import numpy as np

from vcell.data.dataset import PerturbationData
from vcell.data.spec import split_combo
from vcell.data.splits import Split


def trained_batches(data: PerturbationData, split: Split | None) -> list[int]:
    """Batch codes of the perturbed cells ``split`` trains on (every perturbed cell when ``None``): the
    batches whose embedding rows training sets use."""
    index = data.index
    mask = ~index.is_control if split is None else split.mask("train")
    return [int(c) for c in np.unique(index.batch_codes[mask])]


def pert_vocabulary(labels, control: str) -> list[str]:
    """Sorted single targets of the perturbation ``labels`` (``"A+B"`` gives A and B), control excluded."""
    return sorted({t for label in labels if str(label) != control for t in split_combo(str(label))})


def trained_labels(data: PerturbationData, split: Split | None, roles: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Perturbation labels with cells of ``roles`` under ``split`` (every label when ``None``), in the data's order."""
    index = data.index
    if split is None:
        return [str(p) for p in index.perts]
    used = np.zeros(len(index.perts), dtype=bool)
    for role in roles:
        used[np.unique(index.pert_codes[split.mask(role)])] = True
    return [str(p) for p, u in zip(index.perts, used) if u]
