"""The per-job options every entry point checks the same way: time limit, tries, priority,
delay or eta, expiry, tenant and retry backoff.

The Python client, job files, the CLI and the config all take them; one rule and one
message each, so a value is accepted or refused alike wherever it comes from.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import Options  # noqa: F401 - the return type, imported lazily at run time


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


def _seconds(value: Any, what: str, allow_zero: bool = True) -> float | None:
    """A duration: None, a number of seconds, or a datetime.timedelta."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'0 or more' if allow_zero else 'more than 0'} seconds, "
                         f"got {value!r}")
    return float(value)


def _moment(value: Any, what: str, now: float) -> float:
    """An absolute time (a datetime, or epoch seconds) as seconds from ``now`` (>= 0)."""
    if isinstance(value, datetime):
        at = value.timestamp()  # a naive datetime is local time
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        at = float(value)
    else:
        raise ValueError(f"{what} must be a datetime or epoch seconds, got {value!r}")
    return max(0.0, at - now)


def job_options(
    *, timeout: Any = None, tries: Any = None, priority: Any = None, delay: Any = None,
    eta: Any = None, expires: Any = None, tenant: Any = None, backoff: Any = None,
    backoff_max: Any = None, now: float | None = None, what: str = "",
) -> Options:
    """A job's options, checked, with times made relative (the broker counts from when it
    takes the job in, so no clocks need to agree). ``expires`` is seconds from now (a number
    or a timedelta) or a time (a datetime); ``eta`` a time; ``delay`` seconds."""
    from .protocol import MAX_PRIORITY, NO_OPTIONS, Options, check_name

    prefix = f"{what}: " if what else ""
    now = time.time() if now is None else now
    if delay is not None and eta is not None:
        raise ValueError(f"{prefix}give delay or eta, not both")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 0 <= priority <= MAX_PRIORITY):
        raise ValueError(f"{prefix}priority must be a whole number from 0 to {MAX_PRIORITY}, "
                         f"got {priority!r}")
    if tenant is not None:
        if not isinstance(tenant, str):
            raise ValueError(f"{prefix}tenant must be a name, got {tenant!r}")
        check_name(tenant.encode(), "tenant")
    wait = _moment(eta, f"{prefix}eta", now) if eta is not None else _seconds(delay, f"{prefix}delay")
    if isinstance(expires, datetime):
        expires_in: float | None = _moment(expires, f"{prefix}expires", now)
    else:
        expires_in = _seconds(expires, f"{prefix}expires")
    opts = Options(
        timeout=check_timeout(timeout, f"{prefix}timeout"),
        tries=check_tries(tries, f"{prefix}tries"),
        priority=priority,
        delay=wait or None,
        expires=expires_in,
        tenant=tenant or None,
        backoff=_seconds(backoff, f"{prefix}backoff"),
        backoff_max=_seconds(backoff_max, f"{prefix}backoff_max"),
    )
    return NO_OPTIONS if opts == NO_OPTIONS else opts
