"""The folds of a benchmark (:func:`make_folds`): a split file, held-out contexts and/or
perturbations held out in every context, each fold with the contexts it scores."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcell.data.dataset import PerturbationData
from vcell.data.labels import names_list
from vcell.data.split_files import SplitConfig, read_split_toml
from vcell.data.splits import Split, apply_split, cell_load_notes, datasets_in_file, holdout_config
from vcell.data.splits import holdout_perturbations as holdout_perturbations_config
from vcell.errors import VcellError

log = logging.getLogger(__name__)


@dataclass
class Fold:
    """One split to train on, and the held-out contexts to score on it."""

    name: str
    config: SplitConfig
    split: Split
    contexts: list[str]  # context names (not "dataset.context") with test cells



def make_folds(
    data: PerturbationData,
    split_file: str | os.PathLike | None,
    holdout: Sequence[str],
    holdout_perturbations: float | str | Sequence[str] | None = None,
    seed: int = 0,
) -> list[Fold]:
    """The folds of a benchmark: from a split file, held-out contexts and/or held-out perturbations.

    Parameters
    ----------
    data
        The benchmark's data.
    split_file
        A split TOML: one fold, scored on every context with test cells.
    holdout
        Held-out contexts, one fold each (``["all"]``: every context with controls).
    holdout_perturbations
        Perturbations held out in every context (a fraction of the labels drawn with ``seed``, or
        labels; see :func:`~vcell.data.splits.holdout_perturbations`). Alone: one fold, scored on
        every context with cells of them. With ``holdout``: the same labels held out in every fold,
        each fold scored on its held-out context (whose held-out perturbations are unseen everywhere).
    seed
        Seeds the draw of a fraction of perturbations (once, for every fold).

    Returns
    -------
    list[Fold]
    """
    index = data.index
    if split_file is not None:
        if holdout_perturbations is not None:
            raise VcellError("give either --split FILE or --holdout-perturbations, not both (a split file holds its own)")
        cfg = read_split_toml(split_file)
        split = apply_split(index, cfg)
        return [Fold(Path(split_file).stem, cfg, split, _test_contexts(index, split))]
    perts = None
    if holdout_perturbations is not None:  # drawn once: every fold holds out the same labels
        perts = holdout_perturbations_config(index, holdout_perturbations, seed).holdout_perturbations
        if not holdout:
            cfg = holdout_perturbations_config(index, perts)
            split = apply_split(index, cfg)
            return [Fold("perturbations", cfg, split, _test_contexts(index, split))]
    if not holdout:
        raise VcellError("give --split FILE, --holdout-context NAME (or 'all') or --holdout-perturbations FRACTION|LIST|FILE "
                          "(split_file=, holdout=, holdout_perturbations=)")
    names = names_list(holdout)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise VcellError(f"--holdout-context {twice[0]!r} is given twice (holdout=): each held-out context is one fold")
    if len(names) > 1 and "all" in (n.lower() for n in names):
        raise VcellError("--holdout-context all holds out each context in turn (holdout=['all']); give it alone, not with named contexts")
    if [n.lower() for n in names] == ["all"]:
        with_controls = np.unique(index.context_codes[index.is_control])
        names = [str(index.contexts[c]) for c in with_controls]
    folds = []
    for name in names:
        cfg = holdout_config(index, [name]) if perts is None else holdout_perturbations_config(index, perts, contexts=[name])
        split = apply_split(index, cfg)
        contexts = _test_contexts(index, split)
        if perts is not None:  # score the held-out context; the other contexts' held-out cells are only left out
            held = {key.split(".", 1)[1] for key, role in cfg.zeroshot.items() if role == "test"}
            contexts = [c for c in contexts if c in held]
        if not contexts:
            log.warning("context %s has no perturbed cells to predict; skipped", name)
            continue
        same = next((f.name for f in folds if f.contexts == contexts), None)
        if same is not None:  # one context under two names, e.g. 'k562' and 'norman19.k562'
            raise VcellError(f"--holdout-context {same!r} and {name!r} name the same context ({', '.join(contexts)}): "
                             "each held-out context is one fold")
        folds.append(Fold(name, cfg, split, contexts))
    if not folds:
        raise VcellError("no held-out context has perturbed cells to predict")
    return folds


def _test_contexts(index, split: Split) -> list[str]:
    codes = np.unique(index.context_codes[split.mask("test")])
    return [str(index.contexts[c]) for c in codes]


def fold_toml(data: PerturbationData, fold: Fold) -> str:
    """The fold's split as a cell-load TOML, its ``[datasets]`` pointing at the data's file (when it
    was read from one) and :func:`~vcell.data.splits.cell_load_notes` as comments."""
    cfg = fold.config
    if not cfg.datasets and data.path is not None:
        cfg = dataclasses.replace(cfg, datasets=datasets_in_file(data.index, data.path))
    return cfg.to_toml(cell_load_notes(data.index, fold.split, cfg, data.path))


def fold_record(data: PerturbationData, fold: Fold) -> dict:
    """What ``bench.json`` records of a fold's hold-out, read from its split as applied to the data.

    Returns
    -------
    dict
        ``name``; ``contexts`` (scored); ``held_out_contexts`` (scored contexts with no training
        cells); ``held_out_perturbations`` (scored perturbations with no training cells in any
        context); ``scored_perturbations`` (context -> the perturbations scored there).
    """
    index = data.index
    labels = index.perts[index.pert_codes].astype(str)
    contexts = index.contexts[index.context_codes].astype(str)
    test, train = fold.split.mask("test"), fold.split.mask("train")
    scored = {c: sorted(np.unique(labels[test & (contexts == c)]).tolist()) for c in fold.contexts}
    trained = set(np.unique(labels[train]).tolist())
    return {
        "name": fold.name, "contexts": fold.contexts,
        "held_out_contexts": [c for c in fold.contexts if not (train & (contexts == c)).any()],
        "held_out_perturbations": sorted({p for perts in scored.values() for p in perts} - trained),
        "scored_perturbations": scored,
    }
