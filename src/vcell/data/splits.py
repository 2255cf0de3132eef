"""Train/val/test splits of perturbation data, in the cell-load TOML format.

A split file looks like::

    [datasets]
    replogle = "replogle.h5ad"          # name -> file (relative to the TOML file)

    [training]
    replogle = "train"                  # datasets used for training

    [zeroshot]
    "replogle.jurkat" = "test"          # a whole context held out ("dataset.context")

    [fewshot."replogle.rpe1"]            # some perturbations of a context held out
    val = ["AARS"]
    test = ["NUP107", "RPUSD4"]

    [vcell]                             # vcell's own table (cell-load ignores it)
    holdout_perturbations = ["NUP107"]  # test in every context: never trained on

Every perturbed cell gets a role: ``train``, ``val``, ``test`` or ``unused``. Control cells get
``control`` and stay available as basal input for every context, held-out ones included.

Perturbations held out in every context (:func:`holdout_perturbations`) are written as cell-load
holds out perturbations of a context (a ``fewshot`` entry per context with cells of them) and
declared in the ``[vcell]`` table, which cell-load ignores (it reads only ``datasets``,
``training``, ``zeroshot`` and ``fewshot``). With that declaration :func:`apply_split` refuses
(:func:`check_no_leak`) any cell of a held-out perturbation in train or val, or of a validation one
in train, in any context, also when the file is read back; without it, testing X in one context
and training on X in another is an ordinary few-shot split. Labels are exact: ``"A+B"`` is one
label, and holding out ``A`` leaves the ``"A+B"`` cells in training (not a leak; list it too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vcell.data.dataset import CellIndex
from vcell.data.labels import names_list
from vcell.data.perturbation_lists import parse_perturbations
from vcell.data.split_files import SplitConfig, toml_str
from vcell.errors import VcellError, did_you_mean

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
CONTROL = "control"
UNUSED = "unused"


def _check_index(index, where: str) -> None:
    if not isinstance(index, CellIndex):
        hint = " (pass data.index)" if isinstance(getattr(index, "index", None), CellIndex) else ""
        raise VcellError(f"{where}: index must be the data's CellIndex{hint}, got {type(index).__name__}")


def holdout_config(index: CellIndex, contexts: str | Sequence[str], role: str = "test", val_contexts: str | Sequence[str] = ()) -> SplitConfig:
    """Zero-shot split: hold out whole contexts (``"context"`` or ``"dataset.context"``; one name or a
    list), as ``role`` (``"test"`` or ``"val"``), and ``val_contexts`` for validation."""
    _check_index(index, "holdout_config")
    if role not in ("test", "val"):
        raise VcellError(f"role {role!r}: a held-out context is 'test' or 'val'{did_you_mean(str(role), ['test', 'val'])}")
    contexts, val_contexts = names_list(contexts), names_list(val_contexts)
    cfg = SplitConfig(source="--holdout-context")
    cfg.training = {str(d): "train" for d in index.datasets}
    for names, r in ((contexts, role), (val_contexts, "val")):
        for name in names:
            for key in _resolve_context(index, name, cfg.source):
                if key in cfg.zeroshot and cfg.zeroshot[key] != r:
                    raise VcellError(f"context {name!r} is both held out ({cfg.zeroshot[key]}) and a validation context; give it once")
                cfg.zeroshot[key] = r
    return cfg


def holdout_perturbations(
    index: CellIndex,
    which: float | str | Sequence[str],
    seed: int = 0,
    contexts: Sequence[str] = (),
    val: float | str | Sequence[str] = (),
    val_contexts: Sequence[str] = (),
) -> SplitConfig:
    """Hold out perturbations in every context (unseen perturbations), optionally with whole contexts.

    Parameters
    ----------
    index
        The cells (:attr:`PerturbationData.index <vcell.data.dataset.PerturbationData.index>`).
    which
        The held-out (test) perturbations: a fraction in (0, 1) of the non-control perturbation
        labels (rounded, at least one, never all), drawn from the sorted labels with
        ``numpy.random.default_rng(seed)``; or a list of labels (each must have cells); or the
        command line's text for either (:func:`parse_perturbations`). ``()``: none.
    seed
        Seeds the fraction draws: the same seed draws the same labels.
    contexts
        Contexts held out whole as well (``"context"`` or ``"dataset.context"``), as in
        :func:`holdout_config`: unseen contexts and unseen perturbations together.
    val
        Validation perturbations in every context, chosen like ``which`` among the labels it left
        (drawn after it, so they do not change which labels it draws).
    val_contexts
        Validation contexts, as in :func:`holdout_config`; the held-out perturbations stay test
        there too.

    Returns
    -------
    SplitConfig
        Held-out contexts in ``zeroshot``, a ``fewshot`` entry for every other context with cells of
        the chosen labels, and the labels in ``holdout_perturbations`` / ``val_perturbations``
        (:func:`apply_split` then refuses any leak of them). ``A+B`` is one label (module notes).
    """
    _check_index(index, "holdout_perturbations")
    labels = _perturbation_labels(index)
    control = str(index.perts[index.control_code]) if index.control_code >= 0 else None
    test = _choose(labels, which, seed, (), "--holdout-perturbations", control)
    val_labels = _choose(labels, val, seed, test, "--val-perturbations", control)
    if (test or val_labels) and len(test) + len(val_labels) >= len(labels):
        raise VcellError(f"--holdout-perturbations/--val-perturbations hold out all {len(labels)} perturbations; "
                         "leave at least one to train on")
    cfg = holdout_config(index, contexts, val_contexts=val_contexts)  # a name or names, as holdout_config takes them
    cfg.source = "--holdout-perturbations"
    cfg.holdout_perturbations, cfg.val_perturbations = test, val_labels
    for key, present in _labels_per_context(index).items():
        held, validate = [p for p in test if p in present], [p for p in val_labels if p in present]
        whole = cfg.zeroshot.get(key)
        if whole == "test" or not (held or (validate and whole is None)):
            continue
        if whole == "val":  # a validation context: its other perturbations stay val, the held-out ones test
            del cfg.zeroshot[key]
            validate = sorted(present - set(held))
        cfg.fewshot[key] = {role: perts for role, perts in (("val", validate), ("test", held)) if perts}
    return cfg


def _perturbation_labels(index: CellIndex) -> list[str]:
    """The sorted non-control perturbation labels that have cells."""
    return sorted(str(index.perts[c]) for c in np.unique(index.pert_codes[~index.is_control]))


def _labels_per_context(index: CellIndex) -> dict[str, set[str]]:
    """Each context key's non-control perturbation labels."""
    n = len(index.perts)
    perturbed = ~index.is_control
    pairs = np.unique(index.context_key_codes[perturbed].astype(np.int64) * n + index.pert_codes[perturbed])
    names = index.context_key_names
    out: dict[str, set[str]] = {}
    for key, pert in zip(pairs // n, pairs % n):
        out.setdefault(str(names[key]), set()).add(str(index.perts[pert]))
    return out


def _choose(labels: list[str], which, seed: int, taken: Sequence[str], option: str, control: str | None = None) -> list[str]:
    """The labels ``which`` names (a fraction, a list or the command line's text), none of ``taken``.
    The control label in a list is skipped (a challenge's list of what to predict names it too)."""
    if which is None or (isinstance(which, (list, tuple, str)) and not which):
        return []
    if isinstance(which, str):
        which = parse_perturbations(which, option)
    if isinstance(which, (int, float, np.floating)) and not isinstance(which, bool):
        fraction = float(which)
        if not 0 < fraction < 1:
            raise VcellError(f"{option} {which}: a fraction must be between 0 and 1 (exclusive)")
        free = set(labels) - set(taken)
        count = min(max(1, int(fraction * len(labels) + 0.5)), len(free) - 1)
        if count < 1:
            raise VcellError(f"{option} {which}: too few perturbations to draw from ({len(labels)}, {len(taken)} held out already)")
        order = np.random.default_rng(seed).permutation(len(labels))  # validation draws go on where the test draws stop
        return sorted([labels[i] for i in order if labels[i] in free][:count])
    chosen, known = list(dict.fromkeys(str(p) for p in which)), set(labels)
    if control in chosen:
        log.info("%s: the control label %r in the list is skipped (controls are never held out)", option, control)
        chosen.remove(control)
        if not chosen:
            raise VcellError(f"{option}: the list names only the control label {control!r}")
    for p in chosen:
        if p not in known:
            raise VcellError(f"{option}: unknown perturbation {p!r}{did_you_mean(p, labels, n=3)} "
                             f"({len(labels)} non-control perturbations in the data)")
        if p in taken:
            raise VcellError(f"{option}: perturbation {p!r} is already held out with --holdout-perturbations")
    return chosen


def _all_context_keys(index: CellIndex) -> list[str]:
    dotted = [str(d) for d in index.datasets if "." in str(d)]
    if dotted:
        raise VcellError(f"dataset {dotted[0]!r} has a '.' in its name: a split names a context 'dataset.context', cut at its "
                         "first '.' (as cell-load cuts it); rename the dataset (its obs column, or the file)")
    return sorted(index.context_key_names[np.unique(index.context_key_codes)])


def _resolve_context(index: CellIndex, name: str, source: str) -> list[str]:
    keys = _all_context_keys(index)
    if name in keys:
        return [name]
    matches = [k for k in keys if k.split(".", 1)[1] == name]
    if matches:
        return matches
    hint = did_you_mean(name, keys + [k.split(".", 1)[1] for k in keys], n=3)
    raise VcellError(f"{source}: unknown context {name!r}{hint} (contexts: {', '.join(keys)})")


def datasets_in_file(index: CellIndex, path: str | os.PathLike) -> dict[str, Path]:
    """``[datasets]`` for a split of the data in ``path``: each of its datasets -> that file."""
    return {str(d): Path(path).resolve() for d in np.unique(index.datasets)}


def cell_load_notes(index: CellIndex, split: Split, cfg: SplitConfig, data_path: str | os.PathLike | None = None) -> list[str]:
    """Where cell-load, reading ``cfg`` as a TOML, would give cells other roles than ``split`` gives
    them: a file that holds several datasets (cell-load has no dataset column: it reads every cell
    of a dataset's file under its name; ``data_path``: the data's file, which holds ``index``'s
    datasets) and contexts whose perturbed cells no role uses (no controls)."""
    notes = []
    by_file: dict[str, tuple[str, list[str]]] = {}  # real path (links, '..' followed) -> (path as written, names)
    for name, path in cfg.datasets.items():
        by_file.setdefault(os.path.realpath(path), (str(path), []))[1].append(str(name))
    data_file = os.path.realpath(data_path) if data_path is not None else None
    held = [str(d) for d in index.datasets]
    for real, (path, names) in by_file.items():
        if real == data_file and len(held) > 1:
            shared = f"the file {path} holds datasets {', '.join(held)} and [datasets] points {', '.join(names)} at it"
        elif len(names) > 1:
            shared = f"datasets {', '.join(names)} share the file {path}"
        else:
            continue
        notes.append(f"{shared}: cell-load reads every cell of a dataset's file under its name, so it would train and test "
                     "on other cells than vcell does (held-out ones in training where names repeat); give cell-load one file "
                     "per dataset (`vcell data subset FILE --split S.toml --role train --role val --role test --context D.C "
                     "...` writes one) and point [datasets] at them")
    keys, unused = index.context_key_codes, split.mask(UNUSED)
    has_controls = np.unique(keys[index.is_control])
    for code in np.unique(keys[unused & ~np.isin(keys, has_controls)]):
        n = int((unused & (keys == code)).sum())
        notes.append(f"context {index.context_key_names[code]!r} has no control cells: its {n:,} perturbed cells have no role "
                     "here, but cell-load would use them (in training, or in the context's held-out role) and could not "
                     "pair them with controls")
    return notes


def require_training_cells(split: Split, source: str) -> None:
    """A one-line error when ``split`` gives no perturbed cell the role ``train``: nothing could train on it."""
    if not split.mask("train").any():
        raise VcellError(f"{source}: the split leaves no perturbed cell to train on (each is held out, validating, or in a "
                         "context without control cells); leave at least one context with controls and one perturbation to train on")


ROLE_NAMES = np.array((*ROLES, CONTROL, UNUSED), dtype=object)
_CODE = {name: np.int8(i) for i, name in enumerate(ROLE_NAMES)}


@dataclass
class Split:
    """A split applied to data: the role of every cell, as small integer codes."""

    role_codes: np.ndarray
    config: SplitConfig

    @classmethod
    def from_roles(cls, roles, config: SplitConfig | None = None) -> Split:
        """Build from per-cell role names (``train``, ``val``, ``test``, ``control``, ``unused``)."""
        roles = np.asarray(roles)
        codes = np.full(roles.shape, -1, dtype=np.int8)
        for name, code in _CODE.items():
            codes[roles == name] = code
        if (codes < 0).any():
            raise VcellError(f"unknown split role {roles[codes < 0][0]!r}; roles are {', '.join(ROLE_NAMES)}")
        return cls(role_codes=codes, config=config or SplitConfig())

    @property
    def roles(self) -> np.ndarray:
        """Each cell's role name (one object per cell: for small data and inspection)."""
        return ROLE_NAMES[self.role_codes]

    def mask(self, role: str) -> np.ndarray:
        """Boolean mask of the cells with ``role`` (``train``, ``val``, ``test``, ``control`` or ``unused``)."""
        if role not in _CODE:
            raise VcellError(f"unknown role {role!r}{did_you_mean(str(role), list(_CODE))} (roles: {', '.join(_CODE)})")
        return self.role_codes == _CODE[role]

    def summary(self, index: CellIndex) -> pd.DataFrame:
        """Per context: controls, and perturbations/cells in each role.

        Parameters
        ----------
        index : CellIndex
            The cells the split was applied to (``data.index`` of the dataset given to :func:`apply_split`).
        """
        keys = index.context_key_codes
        rows = []
        for key in np.unique(keys):
            in_ctx = keys == key
            row = {"context": index.context_key_names[key], "controls": int((in_ctx & self.mask(CONTROL)).sum())}
            for role in ROLES + (UNUSED,):
                part = in_ctx & self.mask(role)
                row[f"{role}_perts"] = len(np.unique(index.pert_codes[part]))
                row[f"{role}_cells"] = int(part.sum())
            rows.append(row)
        return pd.DataFrame(rows).sort_values("context", ignore_index=True)


def select_cells(
    index: CellIndex, split: Split, roles: Sequence[str] = ("test",), contexts: Sequence[str] = (), controls: bool = True
) -> np.ndarray:
    """Boolean mask of the cells with one of ``roles`` under ``split`` (in ``contexts``, if given),
    with the control cells of the contexts they are in (unless ``controls`` is false).

    ``roles`` are ``train``, ``val``, ``test`` or ``control``; a context is a name (``"T98G"``) or
    a ``"dataset.context"`` key. The held-out cells of a context with its controls are exactly the
    real cells a prediction of that context is scored against (as in ``vcell bench``).
    """
    src = split.config.source
    roles = list(dict.fromkeys(roles)) or ["test"]
    for role in roles:
        if role not in (*ROLES, CONTROL):
            names = [*ROLES, CONTROL]
            raise VcellError(f"unknown role {role!r}{did_you_mean(role, names, n=2)} (roles: {', '.join(names)})")
    keys = index.context_key_codes
    key_names = list(index.context_key_names)
    mask = np.zeros(index.n_cells, dtype=bool)
    for role in roles:
        mask |= split.mask(role)
    if contexts:
        wanted = [key_names.index(k) for name in contexts for k in _resolve_context(index, name, "--context")]
        mask &= np.isin(keys, wanted)
    if not mask.any() or (roles != [CONTROL] and not (mask & ~index.is_control).any()):
        where = f" in context(s) {', '.join(contexts)}" if contexts else ""
        counts = ", ".join(f"{r} {int(split.mask(r).sum())}" for r in ROLES)
        raise VcellError(f"{src}: no {'/'.join(roles)} cells{where} (cells per role: {counts})")
    if controls:
        mask |= split.mask(CONTROL) & np.isin(keys, np.unique(keys[mask]))
    return mask


def apply_split(index: CellIndex, cfg: SplitConfig) -> Split:
    """Give each cell its role under ``cfg``; unknown datasets, contexts or perturbations are errors.

    A split that trains on a perturbation ``cfg`` declares held out in every context (or validates
    on it) is refused, naming the perturbation and the context (:func:`check_no_leak`). Data
    without a dataset column is one dataset named after its file; a split of one dataset names
    it its own way (made on ``pp.h5ad``, applied to ``raw.h5ad``), and ``index`` takes that name.
    """
    _check_index(index, "apply_split")
    src = cfg.source
    named = set(cfg.training) | {k.split(".", 1)[0] for k in (*cfg.zeroshot, *cfg.fewshot)}
    if index.named_by_file and len(index.datasets) == 1 and len(named) == 1 and str(index.datasets[0]) not in named:
        log.info("%s: the data has no dataset column; its cells are the split's one dataset %r", src, *named)
        index.datasets = np.array(sorted(named), dtype=object)
    datasets = [str(d) for d in index.datasets]
    if cfg.datasets:
        undeclared = sorted(named - set(cfg.datasets))
        if undeclared:
            raise VcellError(f"{src}: dataset {undeclared[0]!r} is used but not listed in [datasets]")
    for name in sorted(named):
        if name not in datasets:
            hint = did_you_mean(name, datasets, n=2)
            raise VcellError(f"{src}: unknown dataset {name!r}{hint} (datasets in the data: {', '.join(datasets)})")
    key_names = list(index.context_key_names)
    known_keys = set(_all_context_keys(index))
    for key in (*cfg.zeroshot, *cfg.fewshot):
        if key not in known_keys:
            _resolve_context(index, key, src)  # raises with suggestions
            raise VcellError(f"{src}: unknown context {key!r}")

    keys = index.context_key_codes
    training = set(cfg.training)  # as cell-load: a dataset trains only when [training] names it (or a fewshot entry)
    if not training:
        log.warning("%s: no [training] table: as cell-load reads the file, only the other perturbations of its [fewshot] "
                    "contexts train; name the datasets to train on in [training] (e.g. %s = \"train\")", src,
                    toml_str(datasets[0]))
    train_datasets = [i for i, d in enumerate(datasets) if d in training]
    codes = np.where(np.isin(index.dataset_codes, train_datasets), _CODE["train"], _CODE[UNUSED]).astype(np.int8)
    for key, role in cfg.zeroshot.items():
        codes[keys == key_names.index(key)] = _CODE[role]
    pert_lookup = {str(p): i for i, p in enumerate(index.perts)}
    for key, by_role in cfg.fewshot.items():
        in_ctx = keys == key_names.index(key)
        present = {str(index.perts[c]) for c in np.unique(index.pert_codes[in_ctx])}
        codes[in_ctx & (codes == _CODE[UNUSED])] = _CODE["train"]
        for role, perts in by_role.items():
            for p in perts:
                if p not in present:
                    hint = did_you_mean(p, sorted(present), n=2)
                    raise VcellError(f"{src}: [fewshot.{key!r}] {role}: perturbation {p!r} has no cells in {key!r}{hint}")
            codes[in_ctx & np.isin(index.pert_codes, [pert_lookup[p] for p in perts])] = _CODE[role]
    with_controls = np.unique(keys[index.is_control])
    orphan = ~index.is_control & ~np.isin(keys, with_controls) & (codes != _CODE[UNUSED])
    if orphan.any():
        names = sorted({key_names[k] for k in np.unique(keys[orphan])})
        log.warning("contexts without control cells are left out: %s", ", ".join(names))
        codes[orphan] = _CODE[UNUSED]
    codes[index.is_control] = _CODE[CONTROL]
    split = Split(role_codes=codes, config=cfg)
    check_no_leak(index, split)
    return split


def check_no_leak(index: CellIndex, split: Split) -> None:
    """Refuse a split whose roles use the perturbations its config holds out in every context.

    No cell of a label in ``split.config.holdout_perturbations`` may be ``train`` or ``val``, and no
    cell of one in ``val_perturbations`` may be ``train``, in any context. Labels are compared
    exactly (a held-out ``"A"`` says nothing of ``"A+B"``); a declared label must have cells.

    Raises
    ------
    VcellError
        One line naming the perturbation, the context and the role of its leaked cells.
    """
    cfg = split.config
    declared = (("holdout_perturbations", "test", ("train", "val")), ("val_perturbations", "val", ("train",)))
    if not (cfg.holdout_perturbations or cfg.val_perturbations):
        return
    labels = _perturbation_labels(index)
    known, lookup = set(labels), {str(p): i for i, p in enumerate(index.perts)}
    for name, role, forbidden in declared:
        perts = getattr(cfg, name)
        for p in perts:
            if p not in known:
                raise VcellError(f"{cfg.source}: [vcell] {name}: perturbation {p!r} has no cells in the data{did_you_mean(p, labels, n=3)}")
        held = np.zeros(len(index.perts), dtype=bool)
        held[[lookup[p] for p in perts]] = True
        leak = held[index.pert_codes] & np.isin(split.role_codes, [_CODE[r] for r in forbidden])
        if leak.any():
            _refuse_leak(index, split, leak, name, role)


def _refuse_leak(index: CellIndex, split: Split, leak: np.ndarray, name: str, role: str) -> None:
    first = int(np.flatnonzero(leak)[0])
    pert, key = index.pert_codes[first], index.context_key_codes[first]
    n_cells = int((leak & (index.pert_codes == pert) & (index.context_key_codes == key)).sum())
    others = len(np.unique(index.pert_codes[leak])) - 1
    more = f" (and {others} other held-out perturbation(s) leak)" if others else ""
    key_name = str(index.context_key_names[key])
    raise VcellError(
        f"{split.config.source}: leak: perturbation {str(index.perts[pert])!r} is held out ({role}) in every context "
        f"([vcell] {name}), but {n_cells} of its cells in {key_name!r} are {ROLE_NAMES[split.role_codes[first]]}{more}; "
        f"list it under [fewshot.{toml_str(key_name)}] {role} or remove it from [vcell] {name}")
