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

Every perturbed cell gets a role: ``train``, ``val``, ``test`` or ``unused``. Control cells get
``control`` and stay available as basal input for every context, held-out ones included.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vcell.data.dataset import CellIndex
from vcell.errors import VcellError, did_you_mean

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
CONTROL = "control"
UNUSED = "unused"


@dataclass
class SplitConfig:
    """The content of a split file (or of ``--holdout-context``), not yet applied to data."""

    datasets: dict[str, Path] = field(default_factory=dict)
    training: dict[str, str] = field(default_factory=dict)
    zeroshot: dict[str, str] = field(default_factory=dict)
    fewshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    source: str = "<split>"

    def to_toml(self) -> str:
        """Render as a cell-load style TOML document."""
        q = _toml_str
        lines = ["[datasets]"] + [f"{q(k)} = {q(str(v))}" for k, v in self.datasets.items()]
        lines += ["", "[training]"] + [f"{q(k)} = {q(v)}" for k, v in self.training.items()]
        lines += ["", "[zeroshot]"] + [f"{q(k)} = {q(v)}" for k, v in self.zeroshot.items()]
        lines += ["", "[fewshot]"]
        for key, roles in self.fewshot.items():
            lines += ["", f"[fewshot.{q(key)}]"]
            lines += [f"{role} = [{', '.join(q(p) for p in perts)}]" for role, perts in roles.items()]
        return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_split_toml(path: str | os.PathLike) -> SplitConfig:
    """Read and check the structure of a cell-load style split file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VcellError(f"{path}: split file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VcellError(f"{path}: not a valid TOML file ({exc})") from None
    known = {"datasets", "training", "zeroshot", "fewshot"}
    unknown = set(raw) - known
    if unknown:
        raise VcellError(f"{path}: unknown section [{sorted(unknown)[0]}]; expected {', '.join(sorted(known))}")
    cfg = SplitConfig(source=str(path))
    for name, value in raw.get("datasets", {}).items():
        if not isinstance(value, str):
            raise VcellError(f"{path}: [datasets] {name!r} must be a path string")
        p = Path(value)
        cfg.datasets[name] = p if p.is_absolute() else (path.parent / p)
    for name, value in raw.get("training", {}).items():
        if value != "train":
            raise VcellError(f"{path}: [training] {name!r} = {value!r}; the only accepted value is \"train\"")
        cfg.training[name] = value
    for key, value in raw.get("zeroshot", {}).items():
        _check_key(path, "zeroshot", key)
        if value not in ("val", "test", "train"):
            raise VcellError(f"{path}: [zeroshot] {key!r} = {value!r}; expected \"val\" or \"test\"")
        cfg.zeroshot[key] = value
    for key, roles in raw.get("fewshot", {}).items():
        _check_key(path, "fewshot", key)
        if not isinstance(roles, dict):
            raise VcellError(f"{path}: [fewshot.{key!r}] must be a table with val/test lists")
        bad = set(roles) - {"val", "test"}
        if bad:
            raise VcellError(f"{path}: [fewshot.{key!r}] has unknown key {sorted(bad)[0]!r}; expected val, test")
        for role, perts in roles.items():
            if not isinstance(perts, list) or not all(isinstance(p, str) for p in perts):
                raise VcellError(f"{path}: [fewshot.{key!r}] {role} must be a list of perturbation names")
        both = set(roles.get("val", [])) & set(roles.get("test", []))
        if both:
            raise VcellError(f"{path}: [fewshot.{key!r}] perturbation {sorted(both)[0]!r} is in both val and test")
        cfg.fewshot[key] = {r: list(roles[r]) for r in ("val", "test") if r in roles}
    overlap = set(cfg.zeroshot) & set(cfg.fewshot)
    if overlap:
        raise VcellError(f"{path}: context {sorted(overlap)[0]!r} is in both [zeroshot] and [fewshot]")
    return cfg


def _check_key(path, section: str, key: str) -> None:
    if "." not in key:
        raise VcellError(f"{path}: [{section}] key {key!r} must be \"dataset.context\"")


def holdout_config(index: CellIndex, contexts: list[str], role: str = "test", val_contexts: list[str] = ()) -> SplitConfig:
    """Zero-shot split: hold out whole contexts (``"context"`` or ``"dataset.context"``)."""
    cfg = SplitConfig(source="--holdout-context")
    cfg.training = {str(d): "train" for d in index.datasets}
    for names, r in ((contexts, role), (val_contexts, "val")):
        for name in names:
            for key in _resolve_context(index, name, cfg.source):
                cfg.zeroshot[key] = r
    return cfg


def _all_context_keys(index: CellIndex) -> list[str]:
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
        """Boolean mask of the cells with ``role``."""
        return self.role_codes == _CODE[role]

    def summary(self, index: CellIndex) -> pd.DataFrame:
        """Per context: controls, and perturbations/cells in each role."""
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
    """Give each cell its role under ``cfg``; unknown datasets, contexts or perturbations are errors."""
    src = cfg.source
    datasets = [str(d) for d in index.datasets]
    named = set(cfg.training) | {k.split(".", 1)[0] for k in (*cfg.zeroshot, *cfg.fewshot)}
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
    training = set(cfg.training) if cfg.training else set(datasets)
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
    return Split(role_codes=codes, config=cfg)
