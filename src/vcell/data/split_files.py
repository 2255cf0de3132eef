"""A split's content (:class:`SplitConfig`) and its cell-load style TOML file, read and written.

The file's format is described in :mod:`vcell.data.splits`, which applies a split to data.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vcell.errors import VcellError


@dataclass
class SplitConfig:
    """The content of a split file (or of ``--holdout-context``), not yet applied to data."""

    datasets: dict[str, Path] = field(default_factory=dict)
    training: dict[str, str] = field(default_factory=dict)
    zeroshot: dict[str, str] = field(default_factory=dict)
    fewshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    source: str = "<split>"
    #: Perturbations held out (test) in every context: :func:`apply_split` refuses any of their cells in train or val.
    holdout_perturbations: list[str] = field(default_factory=list)
    #: Validation perturbations in every context: :func:`apply_split` refuses any of their cells in train.
    val_perturbations: list[str] = field(default_factory=list)

    def to_toml(self, notes: list[str] = ()) -> str:
        """Render as a cell-load style TOML document; ``notes`` go first, as comments."""
        q = toml_str
        lines = [f"# note: {note}" for note in notes] + ([""] if notes else [])
        lines += ["[datasets]"] + [f"{q(k)} = {q(str(v))}" for k, v in self.datasets.items()]
        lines += ["", "[training]"] + [f"{q(k)} = {q(v)}" for k, v in self.training.items()]
        lines += ["", "[zeroshot]"] + [f"{q(k)} = {q(v)}" for k, v in self.zeroshot.items()]
        lines += ["", "[fewshot]"]
        for key, roles in self.fewshot.items():
            lines += ["", f"[fewshot.{q(key)}]"]
            lines += [f"{role} = [{', '.join(q(p) for p in perts)}]" for role, perts in roles.items()]
        if self.holdout_perturbations or self.val_perturbations:
            lines += ["", "# vcell's own table (cell-load reads only the tables above): perturbations held out in every context;",
                      "# vcell refuses this split if it trains on any of them, or validates on a held-out one",
                      "[vcell]"]
            for name, perts in (("holdout_perturbations", self.holdout_perturbations), ("val_perturbations", self.val_perturbations)):
                if perts:
                    lines.append(f"{name} = [{', '.join(q(p) for p in perts)}]")
        return "\n".join(lines) + "\n"


def toml_str(s: str) -> str:
    """``s`` as a TOML basic string (quoted, backslashes and quotes escaped)."""
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
    known = {"datasets", "training", "zeroshot", "fewshot", "vcell"}
    unknown = set(raw) - known
    if unknown:
        raise VcellError(f"{path}: unknown section [{sorted(unknown)[0]}]; expected {', '.join(sorted(known))}")
    cfg = SplitConfig(source=str(path))
    for name, value in raw.get("datasets", {}).items():
        if not isinstance(value, str):
            raise VcellError(f"{path}: [datasets] {name!r} must be a path string")
        p = Path(value)  # relative to the TOML's folder, normalised ('..' removed, links kept)
        cfg.datasets[name] = Path(os.path.abspath(p if p.is_absolute() else path.parent / p))
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
    _read_vcell_table(path, raw.get("vcell", {}), cfg)
    return cfg


def _read_vcell_table(path: Path, table, cfg: SplitConfig) -> None:
    """The ``[vcell]`` table: the perturbations held out (or validation) in every context."""
    keys = ("holdout_perturbations", "val_perturbations")
    if not isinstance(table, dict):
        raise VcellError(f"{path}: [vcell] must be a table")
    bad = set(table) - set(keys)
    if bad:
        raise VcellError(f"{path}: [vcell] has unknown key {sorted(bad)[0]!r}; expected {', '.join(keys)}")
    for key in keys:
        perts = table.get(key, [])
        if not isinstance(perts, list) or not all(isinstance(p, str) for p in perts):
            raise VcellError(f"{path}: [vcell] {key} must be a list of perturbation names")
        setattr(cfg, key, list(dict.fromkeys(perts)))
    both = set(cfg.holdout_perturbations) & set(cfg.val_perturbations)
    if both:
        raise VcellError(f"{path}: [vcell] perturbation {sorted(both)[0]!r} is in both holdout_perturbations and val_perturbations")


def _check_key(path, section: str, key: str) -> None:
    if "." not in key:
        raise VcellError(f"{path}: [{section}] key {key!r} must be \"dataset.context\"")
