"""Typed records: frozen dataclasses whose fields are normalised on construction and that round-trip
through JSON (``to_json`` / ``from_json``) and show as a table row (``to_frame``).

Values are kept as they read back from JSON, so a record equals its reloaded copy: tuples (never
tensors or lists), plain ints and floats, and None for an undefined number (NaN). Every box's result
types derive from :class:`Record`, so a result written by the pipeline is read back as the same objects.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar

import pandas as pd

from attnrules.files import json_copy

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _norm(hint: Any, value: Any) -> Any:
    """``value`` in the canonical form of its annotation ``hint`` (from objects or from JSON)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in args if a is not type(None)]
        return _norm(inner, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_norm(args[0], v) for v in value)
        return tuple(_norm(a, v) for a, v in zip(args, value, strict=True))
    if isinstance(hint, type) and issubclass(hint, Record):
        return value if isinstance(value, hint) else hint.from_json(value)
    if hint is float:
        value = float(value)
        return None if math.isnan(value) else value
    if hint is bool:
        return bool(value)
    if hint is int:
        return int(value)
    if hint is dict:
        return json_copy(value)
    return value


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_dump(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class Record:
    """Base of the result dataclasses: fields normalised on construction (see the module docstring),
    ``to_json`` / ``from_json`` / ``to_frame``."""

    __json_record__: ClassVar[bool] = True  # attnrules.files.plain writes records through to_json

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _norm(hints[f.name], getattr(self, f.name)))

    def _derived(self) -> dict:
        """JSON keys computed from the fields (written for readers, ignored by :meth:`from_json`)."""
        return {}

    def to_json(self) -> dict:
        return {**{f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}, **self._derived()}

    @classmethod
    def from_json(cls, data: dict):
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_json needs a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_frame(self) -> pd.DataFrame:
        """One row: the JSON fields (nested values as lists)."""
        return pd.DataFrame([self.to_json()])
