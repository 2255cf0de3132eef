"""What a split trains on: its labels with cells of some roles, their single targets, and its batches."""

from __future__ import annotations

import numpy as np

from vcell.data.dataset import PerturbationData
from vcell.data.spec import split_combo
from vcell.data.splits import CONTROL, Split


def trained_batches(data: PerturbationData, split: Split | None, control_sets: bool = False) -> list[int]:
    """Batch codes of the cells ``split`` trains on (every perturbed cell when ``None``): the batches
    whose embedding rows training sets use. With ``control_sets`` (``control_relative``), also those
    of the controls of the training contexts, the targets of the control label's sets."""
    index = data.index
    mask = ~index.is_control if split is None else split.mask("train")
    if control_sets:
        keys = index.context_key_codes
        controls = index.is_control if split is None else split.mask(CONTROL)
        mask = mask | (controls & np.isin(keys, np.unique(keys[mask])))
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
