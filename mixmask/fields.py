"""Typed settings: a dataclass field with a default, a one-line doc and its valid values, and the check of them.

A base module (no imports beyond the standard library and `mixmask.errors`), so the config sections of the run layer
and the hyper-parameter dataclasses of the methods (`mixmask.core.methods`) declare their fields the same way.
"""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from typing import Any

from mixmask.errors import UserError, did_you_mean


def setting(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
            le: float | None = None, gt: float | None = None) -> Any:
    """A dataclass field holding a setting: its default, one-line doc, and the bounds `check_settings` enforces."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "le": le, "gt": gt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_BOUNDS = (("ge", lambda v, b: v >= b, ">="), ("le", lambda v, b: v <= b, "<="), ("gt", lambda v, b: v > b, ">"))


def check_setting(key: str, value: Any, meta: dict) -> None:
    """UserError naming `key` when `value` is not among its choices or outside its bounds."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise UserError(f"{key}={value!r} is not valid{hint}; valid: {', '.join(map(str, choices))}")
    if value is None or isinstance(value, (bool, str, list)):
        return
    for bound, ok, word in _BOUNDS:
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise UserError(f"{key}={value!r} is out of range: must be {word} {b}")


def check_settings(section: Any, prefix: str) -> None:
    """Check every field of a settings dataclass (and of the dataclasses nested in it) against its metadata."""
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            check_settings(value, f"{prefix}.{f.name}")
        else:
            check_setting(f"{prefix}.{f.name}", value, dict(f.metadata))
