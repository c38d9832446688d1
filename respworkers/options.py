"""The per-job options every entry point checks the same way: time limit and tries.

The Python client, job files, the CLI and the config all take them; one rule and one
message each, so a value is accepted or refused alike wherever it comes from.
"""

from __future__ import annotations

import math
from typing import Any


def check_timeout(value: Any, what: str = "timeout") -> float | None:
    """None (the broker's default), or a finite number of seconds greater than 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}".lstrip())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a number of seconds greater than 0, got {value!r}".lstrip())
    return float(value)


def check_tries(value: Any, what: str = "tries") -> int | None:
    """None (the broker's default), or a whole number of attempts, at least 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number of at least 1, got {value!r}".lstrip())
    return value
