"""respworkers: a responsible ZeroMQ task broker and worker pool.

Public names: :class:`Worker` (derive and override ``process``), :class:`Client`
(submit jobs and wait for results), and the errors in :mod:`respworkers.errors`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client, JobResult
from .errors import (
    BrokerUnavailable,
    Cancelled,
    ConfigError,
    Fail,
    Interrupt,
    JobFailed,
    ProtocolError,
    Refused,
    RespWorkersError,
    Retry,
    TimeLimit,
)
from .worker.base import JobContext, JobOutcome, Worker

__all__ = [
    "BrokerUnavailable",
    "Cancelled",
    "Client",
    "ConfigError",
    "Fail",
    "Interrupt",
    "JobContext",
    "JobFailed",
    "JobOutcome",
    "JobResult",
    "ProtocolError",
    "Refused",
    "RespWorkersError",
    "Retry",
    "TimeLimit",
    "Worker",
    "__version__",
]
