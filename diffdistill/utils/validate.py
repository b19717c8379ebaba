"""Check config values when a run starts (not hours later), with one line that names the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def _kind(tp: Any) -> tuple[type | None, bool]:
    """``(base type, optional)`` of a dataclass field annotation (``int``, ``float``, ``bool``, ``str``, ``list``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base, _ = _kind(args[0]) if len(args) == 1 else (None, False)
        return base, True
    if origin is list:
        return list, False
    return (tp if isinstance(tp, type) else None), False


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against a type annotation (``int``, ``float``, ``bool``, ``str``, ``list``, optional);
    returns it converted where that is lossless (an int for a float, a list-like for a list)."""
    base, optional = _kind(annotation)
    if value is None:
        if not optional and base is not None:
            raise ValueError(f"{key} must be set (got null)")
        return value
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if value != value:
            raise ValueError(f"{key} must be a number, got nan")
        return float(value)
    if base is str and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    if base is list:
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return list(value)
    return value


def check_types(obj: Any, prefix: str) -> None:
    """Every field of the dataclass ``obj`` has its annotated type (ints for floats are converted in place)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_value(f"{prefix}.{f.name}", getattr(obj, f.name), hints[f.name]))


def require(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{key} {message}, got {value!r}")
