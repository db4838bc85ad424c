"""The checks every recipe loader builds on: read a YAML recipe, take a value out of a mapping with its
type and range checked, refuse unknown keys, and raise :class:`RecipeError` with one message shape,
``<file>: <field path>: <what is wrong>`` (``data.yaml: mix.replay.cap: must be int, got str 'x'``).
Loaders pass the dotted path of the mapping they are reading (``""`` at the top level) and wrap their
work in :func:`in_file`, which puts the file in front, so a mistake names where to look and stops the
code location from loading instead of surfacing deep inside a later step.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping

import yaml


class RecipeError(ValueError):
    """A recipe value is missing or invalid; the message names the file and field."""


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, stable across runs and machines (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def join(where: str, key: Any) -> str:
    """The field path of ``key`` inside the mapping at ``where`` (``""`` is the top level)."""
    return f"{where}.{key}" if where else str(key)


def fail(where: str, msg: str) -> RecipeError:
    """The error for the field at ``where`` (raise it): ``"<where>: <msg>"``."""
    return RecipeError(f"{where}: {msg}")


@contextmanager
def in_file(path: str | Path) -> Iterator[None]:
    """Put ``path`` in front of the message of any :class:`RecipeError` raised inside the block."""
    try:
        yield
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of the YAML file at ``path``."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a YAML mapping at the top level")
    return data


def get(d: Mapping[str, Any], key: str, where: str, kind: type | tuple, default: Any = ...) -> Any:
    """``d[key]`` checked to be a ``kind`` (an int is taken as a float, a bool is not a number). A missing
    or null value is ``default``, or an error when no default is given."""
    if key not in d or d[key] is None:
        if default is ...:
            raise fail(join(where, key), "is required")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind in (int, float):
        raise fail(join(where, key), f"must be a number, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise fail(join(where, key), f"must be {names}, got {type(value).__name__} {value!r}")
    return value


def in_range(value: float, lo: float | None, hi: float | None, where: str) -> float:
    """``value`` if it lies within [lo, hi] (None: unbounded on that side) and is not NaN."""
    if math.isnan(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            raise fail(where, f"must be at least {lo}, got {value}")
        if lo is None:
            raise fail(where, f"must be at most {hi}, got {value}")
        raise fail(where, f"must be between {lo} and {hi}, got {value}")
    return value


def number(d: Mapping[str, Any], key: str, where: str, default: Any = ..., *, lo: float | None = None,
           hi: float | None = None, kind: type = float) -> Any:
    """``d[key]`` as a number of ``kind`` (float accepts ints) within [lo, hi]: :func:`get` then
    :func:`in_range`. A default of None is returned unchecked (an optional setting left out)."""
    value = get(d, key, where, kind, default)
    return None if value is None else in_range(value, lo, hi, join(where, key))


def one_of(value: Any, known: Collection, where: str, what: str) -> Any:
    """``value`` if it is one of ``known``; ``what`` names the kind of value in the message."""
    if value not in known:
        raise fail(where, f"unknown {what} {value!r} (known: {', '.join(map(str, known))})")
    return value


def _names(allowed: Iterable[str] | type) -> set[str]:
    if isinstance(allowed, type) and is_dataclass(allowed):
        return {f.name for f in fields(allowed)}
    return set(allowed)


def check_keys(d: Mapping[str, Any], allowed: Iterable[str] | type, where: str) -> None:
    """Refuse a key of ``d`` that is not in ``allowed`` (key names, or a dataclass whose fields they are)."""
    allowed = _names(allowed)
    unknown = sorted(set(d) - allowed, key=str)
    if unknown:
        raise fail(join(where, unknown[0]), f"unknown field (allowed: {', '.join(sorted(allowed))})")


def mapping(value: Any, where: str, allowed: Iterable[str] | type | None = None) -> dict:
    """``value`` checked to be a mapping (and, given ``allowed``, to hold only those keys)."""
    if not isinstance(value, dict):
        raise fail(where, "must be a mapping")
    if allowed is not None:
        check_keys(value, allowed, where)
    return value


def section(d: Mapping[str, Any], key: str, where: str, allowed: Iterable[str] | type | None = None, *,
            required: bool = False) -> dict:
    """The mapping under ``d[key]``, checked like :func:`mapping`; a missing or null one is ``{}``
    (or an error when ``required``)."""
    value = d.get(key)
    if value is None:
        if required:
            raise fail(join(where, key), "is required")
        value = {}
    return mapping(value, join(where, key), allowed)
