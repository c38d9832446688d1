"""The per-job options every entry point checks the same way: time limit, tries, priority,
delay or eta, expiry, tenant and retry backoff.

The Python client, job files, the CLI and the config all take them; one rule and one
message each, so a value is accepted or refused alike wherever it comes from.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta
from typing import Any, Callable

from .errors import InvalidArgument, ProtocolError
from .protocol import MAX_PRIORITY, NO_OPTIONS, Options, check_name


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


#: The longest delay, expiry or backoff (seconds): what the protocol's milliseconds carry.
MAX_SECONDS = 999_999_999


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
    if value > MAX_SECONDS:
        raise ValueError(f"{what} must be at most {MAX_SECONDS} seconds (31 years), got {value!r}")
    return float(value)


def _moment(value: Any, what: str, now: float) -> float:
    """An absolute time (a datetime, or epoch seconds) as seconds from ``now`` (>= 0)."""
    if isinstance(value, datetime):
        at = value.timestamp()  # a naive datetime is local time
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        at = float(value)
    else:
        raise ValueError(f"{what} must be a datetime or epoch seconds, got {value!r}")
    if at - now > MAX_SECONDS:
        raise ValueError(f"{what} must be within {MAX_SECONDS} seconds (31 years) from now, "
                         f"got {value!r}")
    return max(0.0, at - now)


def parse_time(value: Any, what: str) -> datetime | float:
    """A time as people write it in a job file or a flag: ISO 8601 (``2026-12-01T09:00``,
    ``...Z`` or ``...+01:00``; without a zone: local time) or epoch seconds."""
    if isinstance(value, (datetime, int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            pass
    raise ValueError(f"{what} must be a time such as 2026-12-01T09:00:00Z (ISO 8601) or epoch "
                     f"seconds, got {value!r}")


def parse_expiry(value: Any, what: str) -> datetime | timedelta | float | None:
    """``expires``: seconds from now (a number), or a time (ISO 8601 text or a datetime)."""
    if value is None or isinstance(value, (datetime, timedelta)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            moment = parse_time(value, what)
            return moment if isinstance(moment, datetime) else None
    raise ValueError(f"{what} must be seconds from now or a time (ISO 8601), got {value!r}")


#: The options a job may set besides its time limit and tries, as job files and flags name them.
OPTION_FIELDS = ("priority", "delay", "eta", "expires", "tenant", "backoff", "backoff_max")


def job_options(
    *, timeout: Any = None, tries: Any = None, priority: Any = None, delay: Any = None,
    eta: Any = None, expires: Any = None, tenant: Any = None, backoff: Any = None,
    backoff_max: Any = None, now: float | None = None,
    label: Callable[[str], str] = str, what: str = "",
) -> Options:
    """A job's options, checked, with times made relative (the broker counts from when it
    takes the job in, so no clocks need to agree). ``expires`` is seconds from now (a number
    or a timedelta) or a time (a datetime); ``eta`` a time; ``delay`` seconds. ``label``
    names an option in messages (a job file says ``field 'delay'``, the CLI ``--delay``);
    ``what``, if given, goes in front of them (``job 'x': ...``)."""
    try:
        return _job_options(timeout, tries, priority, delay, eta, expires, tenant, backoff,
                            backoff_max, time.time() if now is None else now, label)
    except InvalidArgument as exc:
        if what:
            raise InvalidArgument(f"{what}: {exc}", exc.argument) from None
        raise


def _job_options(timeout: Any, tries: Any, priority: Any, delay: Any, eta: Any, expires: Any,
                 tenant: Any, backoff: Any, backoff_max: Any, now: float,
                 label: Callable[[str], str]) -> Options:
    """Each option checked in turn: a ValueError about one becomes an InvalidArgument
    naming it (``field``, set before each check: cheaper than a block per option)."""
    if (timeout is None and tries is None and priority is None and delay is None and eta is None
            and expires is None and tenant is None and backoff is None and backoff_max is None):
        return NO_OPTIONS  # most jobs: the broker's defaults
    field = "eta"
    try:
        if delay is not None and eta is not None:
            raise ValueError(f"give {label('delay')} or {label('eta')}, not both")
        field = "priority"
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                     or not 0 <= priority <= MAX_PRIORITY):
            raise ValueError(f"{label('priority')} must be a whole number from 0 to {MAX_PRIORITY}, "
                             f"got {priority!r}")
        field = "tenant"
        if tenant is not None:
            if not isinstance(tenant, str):
                raise ValueError(f"{label('tenant')} must be a name, got {tenant!r}")
            try:
                check_name(tenant.encode(), "tenant")
            except ProtocolError as exc:
                raise ValueError(f"{label('tenant')}: {exc.detail}") from None
        field = "eta" if eta is not None else "delay"
        wait = (_moment(eta, label("eta"), now) if eta is not None
                else _seconds(delay, label("delay")))
        field = "expires"
        if isinstance(expires, datetime):
            expires_in: float | None = _moment(expires, label("expires"), now)
        else:
            expires_in = _seconds(expires, label("expires"))
        field = "timeout"
        checked_timeout = check_timeout(timeout, label("timeout"))
        field = "tries"
        checked_tries = check_tries(tries, label("tries"))
        field = "backoff"
        checked_backoff = _seconds(backoff, label("backoff"))
        field = "backoff_max"
        checked_backoff_max = _seconds(backoff_max, label("backoff_max"))
    except ValueError as exc:
        raise InvalidArgument(str(exc), field) from None
    opts = Options(
        timeout=checked_timeout,
        tries=checked_tries,
        priority=priority,
        delay=wait or None,
        expires=expires_in,
        tenant=tenant or None,
        backoff=checked_backoff,
        backoff_max=checked_backoff_max,
    )
    return NO_OPTIONS if opts == NO_OPTIONS else opts
