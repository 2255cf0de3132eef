"""What the model config dataclasses (``STConfig``, ``SEConfig``) share: a dict round trip that
names unknown or missing fields, named presets, and one-line checks of field values.

:func:`field_values` checks values against a dataclass's field types; it is the one type check of
every config a user writes (model configs here, run options in :mod:`vcell.train.options`)."""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

from vcell.errors import VcellError


def _yaml_error(exc) -> str:
    """A YAML error in one line, with the line and column it points at."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_config_file(path: str | os.PathLike, what: str = "config") -> dict:
    """A mapping from a YAML or JSON file (``.json``: JSON, else YAML); an empty file is ``{}``.

    Every way this can fail (missing or unreadable file, syntax error with its line, not a
    mapping) is a one-line error naming the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise VcellError(f"{path}: {what} file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise VcellError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise VcellError(f"{path}: unreadable {what} (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except yaml.YAMLError as exc:
        raise VcellError(f"{path}: unreadable {what} ({_yaml_error(exc)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise VcellError(f"{path}: the {what} must be a mapping of names to values")
    return values


def _describe(kind: Any) -> str:
    """A field type in words, for messages."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) in (list, tuple):
        return f"a list, each item {_describe(typing.get_args(kind)[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


_NO = object()


def _coerce(value: Any, kind: Any) -> Any:
    """``value`` as field type ``kind`` (an int where a number goes, a number where a string goes, as
    YAML reads ``32`` for ``precision: 32``), or ``_NO`` when it is not one."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(kind):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_coerce(v, typing.get_args(kind)[0]) for v in value]
        return _NO if any(i is _NO for i in items) else origin(items)
    if kind is type(None):
        return None if value is None else _NO
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):
        return _NO
    if kind is int:
        return value if isinstance(value, int) else _NO
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else _NO
    if kind is str:
        return value if isinstance(value, str) else (str(value) if isinstance(value, (int, float)) else _NO)
    return value  # a type this check does not know: left to the class's own checks


def field_values(cls, values: Mapping, what: str) -> dict:
    """``values`` checked against the field types of the dataclass ``cls`` (ints, numbers, strings,
    booleans, lists, ``X | None``), with ints made floats where a number goes.

    A value of the wrong type is a one-line :class:`VcellError` naming ``what``, the key and the
    value; names that are not fields are left for the caller to report.
    """
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for f in fields(cls):
        if f.name not in out or f.name not in hints:
            continue
        value = _coerce(out[f.name], hints[f.name])
        if value is _NO:
            hint = ""
            if isinstance(out[f.name], str) and hints[f.name] in (float, int, float | None, int | None):
                try:
                    float(out[f.name])
                    hint = " (YAML reads 1e-4 as a string: write 1.0e-4)" if "e" in out[f.name].lower() else " (remove the quotes)"
                except ValueError:
                    pass
            raise VcellError(f"{what}: {f.name} must be {_describe(hints[f.name])}, got {out[f.name]!r}{hint}")
        out[f.name] = value
    return out


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
        return cls(**field_values(cls, values, f"{cls.KIND} config"))

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
        base = cls.preset_values(preset)  # an unknown --preset is named before the file is read
        if path is None:
            return base
        overrides = read_config_file(path, f"{cls.KIND} config")
        try:
            return cls.preset_values(preset, overrides)
        except VcellError as exc:
            raise VcellError(f"{path}: {exc}") from None

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
