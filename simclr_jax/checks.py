"""The primitives of every config check: a condition that names its field, and what a number is.

Used by the run config checks (validation.py) and the model's own (models/build.py), so every
message has the same shape: `<field> must be <allowed>, got <value>`.
"""

from __future__ import annotations

from typing import Any


def require(ok: bool, field: str, allowed: str, value: Any) -> None:
    """Raise ValueError naming `field`, what it must be and what it is, unless `ok`."""
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def is_number(value: Any) -> bool:
    """An int or float (a bool is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)
