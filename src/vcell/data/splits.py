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

import difflib
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vcell.data.dataset import CellIndex
from vcell.errors import VcellError

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
    return sorted(pd.unique(index.context_keys()))


def _resolve_context(index: CellIndex, name: str, source: str) -> list[str]:
    keys = _all_context_keys(index)
    if name in keys:
        return [name]
    matches = [k for k in keys if k.split(".", 1)[1] == name]
    if matches:
        return matches
    close = difflib.get_close_matches(name, keys + [k.split(".", 1)[1] for k in keys], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise VcellError(f"{source}: unknown context {name!r}{hint} (contexts: {', '.join(keys)})")


@dataclass
class Split:
    """A split applied to data: the role of every cell."""

    roles: np.ndarray
    config: SplitConfig

    def mask(self, role: str) -> np.ndarray:
        """Boolean mask of the cells with ``role``."""
        return self.roles == role

    def summary(self, index: CellIndex) -> pd.DataFrame:
        """Per context: controls, and perturbations/cells in each role."""
        df = pd.DataFrame({"context": index.context_keys(), "role": self.roles, "pert": index.perts[index.pert_codes]})
        rows = []
        for ctx, sub in df.groupby("context", sort=True):
            row = {"context": ctx, "controls": int((sub.role == CONTROL).sum())}
            for role in ROLES + (UNUSED,):
                part = sub[sub.role == role]
                row[f"{role}_perts"] = int(part.pert.nunique())
                row[f"{role}_cells"] = len(part)
            rows.append(row)
        return pd.DataFrame(rows)


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
            close = difflib.get_close_matches(name, datasets, n=2)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise VcellError(f"{src}: unknown dataset {name!r}{hint} (datasets in the data: {', '.join(datasets)})")
    keys = index.context_keys()
    known_keys = set(_all_context_keys(index))
    for key in (*cfg.zeroshot, *cfg.fewshot):
        if key not in known_keys:
            _resolve_context(index, key, src)  # raises with suggestions
            raise VcellError(f"{src}: unknown context {key!r}")

    training = set(cfg.training) if cfg.training else set(datasets)
    dataset_of_cell = index.datasets[index.dataset_codes]
    roles = np.where(np.isin(dataset_of_cell, list(training)), "train", UNUSED).astype(object)
    for key, role in cfg.zeroshot.items():
        roles[keys == key] = role
    pert_names = index.perts[index.pert_codes]
    for key, by_role in cfg.fewshot.items():
        in_ctx = keys == key
        present = set(pert_names[in_ctx])
        roles[in_ctx & (roles == UNUSED)] = "train"
        for role, perts in by_role.items():
            for p in perts:
                if p not in present:
                    close = difflib.get_close_matches(p, sorted(present), n=2)
                    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                    raise VcellError(f"{src}: [fewshot.{key!r}] {role}: perturbation {p!r} has no cells in {key!r}{hint}")
            roles[in_ctx & np.isin(pert_names, perts)] = role
    ctx_keys_with_controls = set(keys[index.is_control])
    orphan = ~index.is_control & ~np.isin(keys, list(ctx_keys_with_controls)) & (roles != UNUSED)
    if orphan.any():
        log.warning("contexts without control cells are left out: %s", ", ".join(sorted(set(keys[orphan]))))
        roles[orphan] = UNUSED
    roles[index.is_control] = CONTROL
    return Split(roles=roles.astype(str), config=cfg)
