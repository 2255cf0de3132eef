"""What the model config dataclasses (``STConfig``, ``SEConfig``) share: a dict round trip that
names unknown or missing fields, named presets, and one-line checks of field values."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import ClassVar

from vcell.errors import VcellError


def read_config_file(path: str | os.PathLike, what: str = "config") -> dict:
    """A mapping from a YAML or JSON file (``.json``: JSON, else YAML); an empty file is ``{}``.

    Every way this can fail (missing file, syntax error with its line, not a mapping) is a
    one-line error naming the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise VcellError(f"{path}: {what} file not found")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise VcellError(f"{path}: unreadable {what} ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise VcellError(f"{path}: the {what} must be a mapping of names to values")
    return values


class ModelConfig:
    """Mixin for a model config ``@dataclass``.

    A subclass sets ``KIND`` (``"ST"``, ``"SE"``: used in error messages), ``REQUIRED`` (the data
    sizes a config cannot exist without) and ``PRESETS`` (name -> field values).
    """

    KIND: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    PRESETS: ClassVar[Mapping[str, Mapping]] = {}

    def to_dict(self) -> dict:
        """Every field, JSON/YAML-ready."""
        return asdict(self)

    @classmethod
    def check_fields(cls, values: Mapping) -> None:
        """Raise a one-line error naming the keys of ``values`` that are not fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VcellError(f"{cls.KIND} config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")

    @classmethod
    def from_dict(cls, values: Mapping):
        """A config from field values (unknown or missing required fields are errors)."""
        cls.check_fields(values)
        missing = sorted(n for n in cls.REQUIRED if n not in values)
        if missing:
            raise VcellError(f"{cls.KIND} config: missing required field(s) {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def preset_values(cls, preset: str, overrides: Mapping | None = None) -> dict:
        """The field values of ``preset`` with ``overrides`` on top.

        Names and values are checked now, before any data is read (with placeholder data sizes:
        the real ones are filled in later).
        """
        if preset not in cls.PRESETS:
            raise VcellError(f"unknown {cls.KIND} preset {preset!r}; choose one of {', '.join(cls.PRESETS)}")
        values = {**cls.PRESETS[preset], **dict(overrides or {})}
        cls.from_dict({**{name: 1 for name in cls.REQUIRED}, **values})
        return values

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, preset: str = "default") -> dict:
        """The field values of ``preset`` with the overrides in the YAML/JSON file ``path`` on top.

        Data sizes are filled in when the model is built; ``path=None`` gives the preset alone.
        """
        overrides = read_config_file(path, f"{cls.KIND} config") if path is not None else {}
        return cls.preset_values(preset, overrides)

    @classmethod
    def preset(cls, name: str, **overrides):
        """A config from preset ``name``; ``overrides`` must include the data sizes (``REQUIRED``)."""
        return cls.from_dict(cls.preset_values(name, overrides))

    def check_positive(self, names: Iterable[str]) -> None:
        """Each named field must be an integer >= 1."""
        for name in names:
            if int(getattr(self, name)) < 1:
                raise VcellError(f"{self.KIND} config: {name} must be a positive integer, got {getattr(self, name)!r}")

    def check_dropout(self, value: float) -> None:
        """``value`` must be a dropout probability in [0, 1)."""
        if not 0.0 <= value < 1.0:
            raise VcellError(f"{self.KIND} config: dropout must be in [0, 1), got {value}")
