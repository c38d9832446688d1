"""One base exception so callers can catch everything respworkers raises on purpose."""

from __future__ import annotations


class RespWorkersError(Exception):
    """Base class of every error respworkers raises deliberately."""


class ConfigError(RespWorkersError):
    """A config file, key, value or flag is wrong; the message names which."""


class FlagError(ConfigError):
    """A command-line flag's value is wrong: ``flag`` and ``detail`` apart, for usage messages."""

    def __init__(self, flag: str, detail: str) -> None:
        super().__init__(f"{flag}: {detail}")
        self.flag = flag
        self.detail = detail


class ProtocolError(RespWorkersError):
    """A message on the wire does not follow docs/protocol.md.

    ``reason`` is a short machine-friendly phrase (it is also what the broker
    counts and, where it can, sends back), the message adds the detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TargetError(RespWorkersError):
    """A ``module:Class`` worker target cannot be imported or is not a Worker."""


class JobFileError(RespWorkersError):
    """A job file for ``rw submit`` is malformed; the message names the line and field."""


class JobFailed(RespWorkersError):
    """A job ended without a result (failed after all tries, or cancelled)."""

    def __init__(self, job_id: str, reason: str, error: str = "") -> None:
        super().__init__(f"job {job_id!r} {reason}" + (f": {error}" if error else ""))
        self.job_id = job_id
        self.reason = reason
        self.error = error


class BrokerUnavailable(RespWorkersError):
    """The broker did not answer in time."""


class InvalidArgument(RespWorkersError, ValueError):
    """An argument a client method was given is wrong; raised before anything is sent.

    ``argument`` names it (``queue``, ``timeout``, ``job_id``, ...), and so does the
    message. A ValueError too, so code written against ``except ValueError`` still works.
    """

    def __init__(self, message: str, argument: str = "") -> None:
        super().__init__(message)
        self.argument = argument


class InvalidType(InvalidArgument, TypeError):
    """An argument of the wrong type (a payload that is not bytes, an id that is not a str):
    also a TypeError, as Python's own checks raise for those."""


class ClientClosed(RespWorkersError):
    """The client was closed: before this call, or while the call waited (another task or
    thread closed it)."""


class Refused(RespWorkersError):
    """The broker refused a submission (for example: broker full, bad options)."""

    def __init__(self, job_id: str, code: str, text: str) -> None:
        super().__init__(f"job {job_id!r} refused ({code}): {text}")
        self.job_id = job_id
        self.code = code
        self.text = text


# --- raised by a worker's ``process`` -------------------------------------------------------


class Retry(RespWorkersError):
    """Raise in ``process`` to end this attempt as a retry: after ``after`` seconds if given,
    else after the job's backoff. It uses one of the job's tries."""

    def __init__(self, reason: str = "", *, after: float | None = None) -> None:
        if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))
                                  or not 0 <= after < 10 ** 9):
            raise ValueError(f"Retry(after=...) takes seconds from 0, got {after!r}")
        super().__init__(reason or "retry asked for by the worker")
        self.reason = reason
        self.after = None if after is None else float(after)


class Fail(RespWorkersError):
    """Raise in ``process`` to fail the job at once, without its further tries: for errors no
    retry can fix (a malformed payload, a missing file)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "failed by the worker")
        self.reason = reason


class Interrupt(BaseException):
    """Raised inside ``process`` by the library. A BaseException, like KeyboardInterrupt, so
    that a broad ``except Exception`` in job code does not swallow it; catch it by name to
    clean up."""


class Cancelled(Interrupt):
    """The job is over (cancelled, done by another attempt, failed or expired): stop now.
    If ``process`` has not returned within ``[worker] cancel_grace`` seconds the worker
    process exits and its pool starts a fresh one."""


class TimeLimit(Interrupt):
    """The job reached its time limit (the soft limit). The broker already gives the job to
    another worker; at twice the limit plus 5 s the worker process exits (the hard limit)."""
